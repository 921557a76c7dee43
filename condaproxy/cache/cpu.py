"""The CPU pool: work that keeps a core busy for seconds, kept off the executor that does file I/O.

Transcoding repodata, learning digests from it, rewriting a held-back document or a shard index,
reading a shard index and hashing a finished file take seconds for conda-forge-sized documents.
On the loop's default executor they took every thread, and the blob opens and chunk reads of
hits and live streams waited behind them (a 100 kB hit went from 2 ms to 2-4 s). Here they run
on a few threads of their own behind a bounded queue; the default executor is left to short
blocking calls (open, pread, write, fsync).

Past the queue, a job that may be refused (a derivation a client asked for) gets Overloaded
(503); any other waits its turn on the loop, which costs a suspended coroutine, not a thread.
A slot is given back when its thread is done, not when its caller stops waiting, so a caller
that is cancelled cannot let more jobs in than there are slots.

Threads, not processes: the heavy parts (zstd, bz2, gzip, sha256) release the GIL, and the
Python-heavy ones (JSON events, msgpack walking) are bounded per document (conda.digests,
conda.packed) and give the GIL back at every switch interval. Processes would add a copy of
every result and a pool to rebuild when a worker dies, for no bound these do not already give.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from condaproxy.errors import Overloaded

log = logging.getLogger(__name__)

T = TypeVar("T")


def default_workers() -> int:
    """Half the cores, and at least two: one long job (a bz2 derivation) must not hold up all others."""
    return max(2, (os.cpu_count() or 1) // 2)


class CpuHook(Protocol):
    """Told of every job in its worker thread, before and after it runs (for tests)."""

    def started(self, name: str) -> None:
        """A job named name (its function's name) starts on the current thread."""

    def finished(self, name: str) -> None:
        """The job ended (returned or raised)."""


class CpuPool:
    """A few threads for CPU-heavy jobs, at most `limit` jobs admitted (running or queued)."""

    def __init__(self, workers: int, queue: int, hook: CpuHook | None = None) -> None:
        if workers < 1 or queue < 0:
            raise ValueError(f"CpuPool needs workers >= 1 and queue >= 0, not {workers} and {queue}")
        self.workers = workers
        self.limit = workers + queue
        self._hook = hook
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="condaproxy-cpu")
        self._slots = asyncio.Semaphore(self.limit)
        self._jobs: set[concurrent.futures.Future[Any]] = set()
        self.waiting = 0  # jobs waiting on the loop for a slot
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.admitted}/{self.limit} admitted, {self.waiting} waiting"
        return f"<CpuPool {self.workers} workers, {state}>"

    @property
    def admitted(self) -> int:
        """Jobs handed to the threads and not yet done: running or queued there (never past limit)."""
        return len(self._jobs)

    async def run(self, fn: Callable[..., T], *args: Any, refuse: bool = False) -> T:
        """fn(*args) on a worker thread; with refuse, Overloaded at once instead of waiting for room."""
        if self._closed:
            raise RuntimeError(f"{self!r}: run() after close()")
        if refuse and self._slots.locked():
            raise Overloaded("the proxy's CPU work queue is full")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        loop = asyncio.get_running_loop()
        try:
            job = self._executor.submit(self._call, fn, args)
        except BaseException:
            self._slots.release()
            raise
        self._jobs.add(job)
        job.add_done_callback(lambda done: self._done(loop, done))
        # Cancelling the caller cancels a job still queued; a running one runs to its end.
        return await asyncio.wrap_future(job)

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        name = getattr(fn, "__name__", type(fn).__name__)
        if self._hook is not None:
            self._hook.started(name)
        try:
            return fn(*args)
        finally:
            if self._hook is not None:
                self._hook.finished(name)

    def _done(self, loop: asyncio.AbstractEventLoop, job: concurrent.futures.Future[Any]) -> None:
        # In the worker thread (or the loop's, for a job cancelled before it ran).
        with contextlib.suppress(RuntimeError):  # the loop is gone: nothing left to admit
            loop.call_soon_threadsafe(self._release, job)

    def _release(self, job: concurrent.futures.Future[Any]) -> None:
        if job in self._jobs:
            self._jobs.discard(job)
            self._slots.release()

    async def close(self, grace: float = 30.0) -> None:
        """Drop queued jobs, wait (bounded) for running ones; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        running = [asyncio.wrap_future(job) for job in self._jobs]
        if not running:
            return
        done, late = await asyncio.wait(running, timeout=grace)
        for future in done:
            if not future.cancelled():
                future.exception()  # retrieved: nobody waits for these results any more
        if late:
            log.warning("%d CPU jobs still running at shutdown", len(late))
