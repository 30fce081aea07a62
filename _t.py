import time,torch,pathlib,tempfile,cProfile,pstats,io
import tests.dist.test_runtime as T
from tests.dist.launcher import spawn, free_port, env_for, rendezvous
from broadface.dist import init_distributed, destroy_distributed
def w(rank, world, tmp, port):
    rendezvous(tmp, rank, world)
    env = init_distributed("cpu", timeout_s=2.0, wait_timeout_s=60.0, env=env_for(rank, world, port))
    pr=cProfile.Profile(); pr.enable(); T._zero_check(rank); pr.disable()
    if rank==0:
        s=io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(8); print(s.getvalue()[:3000])
    destroy_distributed()
tmp=pathlib.Path(tempfile.mkdtemp())
spawn(w, 2, tmp, free_port(), init="none", timeout=120)
