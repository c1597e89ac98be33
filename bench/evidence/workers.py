"""Forked worker processes for the bench: every draw is seeded by what it is for, so the results are those
of one process."""
from __future__ import annotations

import torch

_JOB = None    # the job of the forked workers of `in_workers`


def _run_job(item):
    torch.set_num_threads(1)      # as in a forked DataLoader worker: no OpenMP thread pool in the child
    return _JOB(item)


def in_workers(job, items: list, workers: int) -> list:
    """[job(item) for item in items], run by `workers` forked processes that inherit the loaded models.

    The bench's jobs seed every draw by what it is for (an identity's name, a sample's seed), so their
    results do not depend on the number of workers. Without the fork start method (Windows) everything
    runs here.
    """
    global _JOB
    import multiprocessing

    if workers <= 1 or len(items) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [job(item) for item in items]
    _JOB = job
    try:
        with multiprocessing.get_context("fork").Pool(min(workers, len(items))) as pool:
            return pool.map(_run_job, items, chunksize=1)
    finally:
        _JOB = None
