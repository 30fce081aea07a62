"""run_parallel: every job once, results in job order, done() as each ends, errors surface."""
import math
import operator
import time

import pytest

from broadface.study.parallel import run_parallel

JOBS = [(3, 2), (2, 10), (5, 3), (7, 1)]


@pytest.mark.parametrize("workers", [1, 2])
def test_results_in_job_order_and_done_called_once_per_job(workers):
    seen = []
    out = run_parallel(operator.pow, JOBS, workers, lambda i, r: seen.append((i, r)))
    assert out == [b ** e for b, e in JOBS]
    assert sorted(seen) == [(i, b ** e) for i, (b, e) in enumerate(JOBS)]


def _echo_after(x, delay):
    time.sleep(delay)
    return x


def test_results_in_job_order_when_jobs_end_out_of_order():
    seen = []
    out = run_parallel(_echo_after, [("slow", 1.0), ("fast", 0.0), ("next", 0.0)], 2, lambda i, r: seen.append(r))
    assert out == ["slow", "fast", "next"]
    assert seen[0] == "fast"  # done() in completion order: a caller saves each run as it ends


def test_one_worker_runs_in_this_process_in_order():
    order = []

    def fn(x):  # a local function: only possible without spawning
        order.append(x)
        return -x

    assert run_parallel(fn, [(1,), (2,), (3,)], 1) == [-1, -2, -3]
    assert order == [1, 2, 3]


def test_a_failing_job_raises_in_the_parent():
    with pytest.raises(ValueError):
        run_parallel(math.sqrt, [(4.0,), (-1.0,)], 2)
