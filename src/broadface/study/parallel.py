"""Independent jobs in spawned processes, a few at a time: the demo's and the face benchmark's runs.

Spawned, not forked: each job starts from a clean interpreter (no torch thread pool or RNG state
inherited from the parent), so a job's result depends on its arguments alone, not on what ran beside
it. Each worker sets up its allocator as the ``broadface`` command does (``broadface.allocator``).
The study's own scheduler (``bench/study.py``) also orders warm starts before the arms that need
them; everything without such dependencies goes through :func:`run_parallel`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence


def run_parallel(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int,
                 done: Callable[[int, Any], None] | None = None) -> list:
    """``fn(*job)`` for every job, ``workers`` processes at a time (``workers <= 1``: in this process).

    ``done(i, result)`` is called in the parent as job ``i`` ends (completion order, so a caller can
    save each result at once); the returned list is in the order of ``jobs``. ``fn`` must be importable
    by name (a module-level function or a ``functools.partial`` of one). A job that raises re-raises
    here, after the jobs already running have finished."""
    results: dict[int, Any] = {}

    def finish(i: int, result: Any) -> None:
        results[i] = result
        if done is not None:
            done(i, result)

    if workers <= 1:
        for i, job in enumerate(jobs):
            finish(i, fn(*job))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        from broadface.allocator import configure_from_env

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=configure_from_env) as pool:
            futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
            for f in as_completed(futures):
                finish(futures[f], f.result())
    return [results[i] for i in range(len(jobs))]
