"""The distributed context (torchrun-style setup, joining a group, rank-0-only work, errors on every rank),
collectives with a correct backward, and ZeRO, on 2 gloo processes."""
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: F401  (heavy; imported once, before forking)

from broadface.dist import (DistContext, all_gather_tensor, all_gather_with_grad, gather_to, init_distributed,
                            reduce_mean, reduce_sums)
from broadface.train.memory import zero_redundancy
from broadface.train.optim import LARS
from tests.helpers import env_for, free_port, rendezvous, spawn

WORLD, TIMEOUT = 2, 2.0  # the default group's timeout; rank 0's "evaluation" takes longer


def slow_eval(seconds):
    time.sleep(seconds)
    return {"recall@1": 0.5}


def failing_eval():
    raise ValueError("boom in evaluation")


def _zero_check(rank):
    """ZeRO over replicated params + plain optimizer over a rank-local param == the unwrapped optimizer."""
    out = {}
    for cls, kw in ((torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (LARS, dict(lr=0.1, momentum=0.9))):
        models = []
        for _ in range(2):
            torch.manual_seed(0)
            models.append((nn.Linear(4, 3), nn.Parameter(torch.full((2, 4), float(rank + 1)))))
        extra = {"lars_adapt": False} if cls is LARS else {}  # a group key that is no constructor argument
        groups = lambda m: [{"params": [m[0].weight, m[1]], "name": "w"},  # noqa: E731
                            {"params": [m[0].bias], "lr": 0.05, "name": "b", **extra}]
        ref, split = cls(groups(models[0]), **kw), zero_redundancy(cls(groups(models[1]), **kw), [models[1][1]])
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            grads = [torch.randn(3, 4, generator=g), torch.randn(3, generator=g)]
            local_grad = torch.randn(2, 4, generator=g) * (rank + 1)
            if step == 2:  # a scheduler sets lr through param_groups: both parts follow
                for opt in (ref, split):
                    for group in opt.param_groups:
                        group["lr"] *= 0.5
            for (lin, loc), opt in zip(models, (ref, split)):
                lin.weight.grad, lin.bias.grad, loc.grad = grads[0].clone(), grads[1].clone(), local_grad.clone()
                opt.step()
        (a, la), (b, lb) = models
        out[cls.__name__] = (torch.allclose(a.weight, b.weight) and torch.allclose(a.bias, b.bias)
                             and torch.allclose(la, lb))  # the local param kept this rank's values
        split.consolidate_state_dict(to=0)
        if rank == 0:
            out[cls.__name__ + "_state"] = sorted(split.state_dict())
    return out


def _worker(rank, world, tmp, port):
    rendezvous(tmp, rank, world)  # start together: the 2 s default timeout must only bite where intended
    ctx = init_distributed("cpu", timeout_s=TIMEOUT, wait_timeout_s=60.0, env=env_for(rank, world, port))
    res = {"env": (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend, ctx.is_main, str(ctx.device))}
    joined = init_distributed("cpu")  # the group exists now: a second context joins it
    res["joined"] = (joined.rank, joined.world_size, joined.owns_group, ctx.owns_group)
    # uneven all-gather with backward: each rank weights every gathered row differently
    x = torch.full((3 - rank, 2), float(rank + 1), requires_grad=True)
    gathered = all_gather_with_grad(x)
    weights = torch.arange(10.0).view(5, 2) * (rank + 1)
    (gathered * weights).sum().backward()
    start = 0 if rank == 0 else 3
    res["gathered"] = gathered.detach()
    res["grad_ok"] = torch.equal(x.grad, 3 * torch.arange(10.0).view(5, 2)[start:start + 3 - rank])  # Σ_r (r+1)
    res["plain"] = all_gather_tensor(torch.tensor([rank] * (rank + 1)))
    res["mean"] = (reduce_mean(float(rank)), reduce_mean(torch.tensor([rank, 2.0 * rank])).tolist())
    res["sums"] = reduce_sums({"correct": rank + 1, "total": 10})
    got = gather_to(torch.full((rank + 1, 2), float(rank)), dst=0)
    res["gather_to"] = None if got is None else [t.tolist() for t in got]
    # rank-0-only evaluation longer than the default group's timeout: the others wait on the gloo wait_group
    t = time.monotonic()
    res["eval"] = ctx.run_on_main(slow_eval, 1.5 * TIMEOUT)
    res["waited"] = time.monotonic() - t
    try:
        ctx.run_on_main(failing_eval)
        res["error"] = None
    except (ValueError, RuntimeError) as err:
        res["error"] = (type(err).__name__, "boom in evaluation" in str(err))
    res["broadcast"] = ctx.broadcast(f"from rank {rank}")
    res["mean"] = (res["mean"], ctx.mean({"step": 3, "loss": float(rank), "name": "x", "none": None}))
    try:  # one rank raises: every rank raises, none waits
        ctx.agree(lambda: 1 / 0 if rank == 1 else "fine")
        res["agree"] = None
    except (ZeroDivisionError, RuntimeError) as err:
        res["agree"] = (type(err).__name__, "rank 1 failed" in str(err) or rank == 1)
    res.update(_zero_check(rank))
    torch.save(res, tmp / f"runtime.{rank}.pt")
    # control: the same wait on the *default* group does time out, which is what run_on_main avoids
    if rank == 0:
        time.sleep(1.5 * TIMEOUT)
    t = time.monotonic()
    try:
        dist.barrier()
        res["control"] = "passed"
    except RuntimeError:
        res["control"] = "timed out"
    res["control_s"] = time.monotonic() - t
    torch.save(res, tmp / f"runtime.{rank}.pt")
    ctx.close()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runtime")
    spawn(_worker, WORLD, tmp, free_port(), init="none", timeout=120)
    return [torch.load(tmp / f"runtime.{r}.pt", weights_only=False) for r in range(WORLD)]


def test_init_from_torchrun_environment(results):
    assert results[0]["env"] == (0, 2, 0, "gloo", True, "cpu")
    assert results[1]["env"] == (1, 2, 1, "gloo", False, "cpu")
    assert results[1]["joined"] == (1, 2, False, True)  # the joining context will not destroy the group


def test_broadcast_mean_and_agree(results):
    for r in results:
        assert r["broadcast"] == "from rank 0"
        assert r["mean"][1] == {"step": 3, "loss": 0.5, "name": "x", "none": None}  # floats averaged, rest kept
    assert results[1]["agree"] == ("ZeroDivisionError", True)  # the failing rank re-raises its own error
    assert results[0]["agree"] == ("RuntimeError", True)  # the others learn which rank failed


def test_all_gather_uneven_lengths_and_backward(results):
    for r in results:
        assert torch.equal(r["gathered"], torch.tensor([[1.0, 1.0]] * 3 + [[2.0, 2.0]] * 2))
        assert r["grad_ok"]  # each rank gets its own rows' gradient, summed over ranks
        assert r["plain"].tolist() == [0, 1, 1]


def test_metric_reductions(results):
    for r in results:
        assert r["mean"][0] == (0.5, [0.5, 1.0])
        assert r["sums"] == {"correct": 3.0, "total": 20.0}
    assert results[0]["gather_to"] == [[[0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]] and results[1]["gather_to"] is None


def test_rank0_only_work_outlasts_the_collective_timeout(results):
    for r in results:
        assert r["eval"] == {"recall@1": 0.5}
    assert results[1]["waited"] >= 1.5 * TIMEOUT
    assert results[0]["error"] == ("ValueError", True)  # rank 0 re-raises its own error
    assert results[1]["error"] == ("RuntimeError", True)  # the others get it instead of a hang
    assert results[1]["control"] == "timed out"  # waiting on the default group would have failed


def test_zero_redundancy_equals_the_plain_optimizer(results):
    for r in results:
        assert r["SGD"] and r["LARS"]
    assert results[0]["SGD_state"] == ["local", "replicated"]


def test_environment_errors_name_the_variable():
    assert init_distributed("cpu", env={}) == DistContext()  # one process: rank 0 of 1
    one = DistContext()
    assert one.run_on_main(lambda: 7) == 7 and one.broadcast(5) == 5 and one.agree(lambda: 3) == 3
    assert one.mean({"loss": 1.5}) == {"loss": 1.5} and one.is_main and not one.distributed
    base = env_for(0, 2, 29500)
    with pytest.raises(ValueError, match="RANK is not set"):
        init_distributed("cpu", env={k: v for k, v in base.items() if k != "RANK"})
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        init_distributed("cpu", env={k: v for k, v in base.items() if k != "MASTER_ADDR"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        init_distributed("cpu", env=dict(base, WORLD_SIZE="two"))
    with pytest.raises(ValueError, match=r"RANK=2 is outside \[0, 2\)"):
        init_distributed("cpu", env=dict(base, RANK="2"))
    with pytest.raises(ValueError, match="MASTER_PORT=70000"):
        init_distributed("cpu", env=dict(base, MASTER_PORT="70000"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            init_distributed("cuda", env=base)
