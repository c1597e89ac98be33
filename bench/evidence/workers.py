"""Forked worker processes for the bench: every draw is seeded by what it is for, so the results are those
of one process."""
from __future__ import annotations

import pickle

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


def in_background(job, fork: bool):
    """Start job() in one forked process now and return a function that waits for its result: work that
    needs nothing made later runs while this process trains on one core. Without `fork` (or the fork start
    method) the returned function runs job() here when called, with the same result."""
    import multiprocessing

    if not fork or "fork" not in multiprocessing.get_all_start_methods():
        return job
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child():
        torch.set_num_threads(1)
        # plain pickle, data in the message: torch's own reductions would pass tensors as handles into this
        # process's memory, which ends with it
        try:
            message = pickle.dumps((True, job()))
        except BaseException:      # the parent re-raises it with the child's traceback
            import traceback

            message = pickle.dumps((False, traceback.format_exc()))
        send.send_bytes(message)

    process = ctx.Process(target=child, daemon=True)
    process.start()
    send.close()

    def result():
        ok, value = pickle.loads(receive.recv_bytes())
        process.join()
        if not ok:
            raise RuntimeError(f"the background job failed:\n{value}")
        return value

    return result
