"""Load generators that run in their own processes: aiohttp clients that check every body's sha256.

A ClientPool keeps a few spawned processes for the whole run. Jobs carry absolute start times
(time.monotonic() is one clock for every process on Linux), so the clients of several
processes start together, and report times on that same clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from multiprocessing.pool import AsyncResult, Pool
from typing import Any

import aiohttp

READ_BUFSIZE = 1 << 21


@dataclass
class Fetch:
    """One GET to make: when, and (optionally) when to give up reading (a time-boxed stream)."""

    url: str
    start_at: float
    stop_at: float | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Got:
    """What one GET received: the body's size and sha256, and when things happened (monotonic)."""

    url: str
    status: int = 0
    size: int = 0
    sha256: str = ""
    started: float = 0.0
    first_byte: float = 0.0
    ended: float = 0.0
    complete: bool = False  # read to the end (not cut at stop_at)
    xcache: str = ""
    encoding: str = ""
    error: str = ""

    @property
    def ttfb(self) -> float:
        return self.first_byte - self.started if self.first_byte else float("nan")


def session() -> aiohttp.ClientSession:
    """A client session for measurements: no connection limit, no decompression, big reads."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding",),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120),
        read_bufsize=READ_BUFSIZE,
    )


async def get(s: aiohttp.ClientSession, job: Fetch) -> Got:
    """One GET at job.start_at, the body hashed as it arrives."""
    got = Got(job.url)
    await asyncio.sleep(max(0.0, job.start_at - time.monotonic()))
    got.started = time.monotonic()
    hasher = hashlib.sha256()
    try:
        async with s.get(job.url, headers=job.headers) as resp:
            got.status = resp.status
            got.xcache = resp.headers.get("X-Cache", "")
            got.encoding = resp.headers.get("Content-Encoding", "")
            while True:
                if job.stop_at is not None:
                    left = job.stop_at - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        chunk = await asyncio.wait_for(resp.content.readany(), left)
                    except TimeoutError:
                        break
                else:
                    chunk = await resp.content.readany()
                if not chunk:
                    got.complete = True
                    break
                if not got.first_byte:
                    got.first_byte = time.monotonic()
                hasher.update(chunk)
                got.size += len(chunk)
            if not got.complete:
                resp.close()  # time is up: drop the connection
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        got.error = f"{type(exc).__name__}: {exc}"
    got.ended = time.monotonic()
    got.sha256 = hasher.hexdigest()
    return got


async def _fetch_all(jobs: list[Fetch]) -> list[Got]:
    async with session() as s:
        return list(await asyncio.gather(*(get(s, j) for j in jobs)))


def fetch_all(jobs: list[Fetch]) -> list[Got]:
    """Make every GET at its start time, concurrently, each on its own connection."""
    return asyncio.run(_fetch_all(jobs))


@dataclass
class Latencies:
    """Request start times and latencies (seconds) of one latency process, and what went wrong."""

    starts: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    ok: int = 0
    bad: int = 0
    errors: list[str] = field(default_factory=list)


async def _latency_loop(
    urls: list[str], expected: dict[str, str], conns: int, start_at: float, stop_at: float, stop_file: str
) -> Latencies:
    out = Latencies()
    stop = asyncio.Event()

    async def watch() -> None:
        # The stop flag is a file another process creates: polled, there is no event to wait on.
        while time.monotonic() < stop_at and not os.path.exists(stop_file):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        stop.set()

    async def client(s: aiohttp.ClientSession, i: int) -> None:
        while not stop.is_set():
            url = urls[i % len(urls)]
            i += conns
            t0 = time.monotonic()
            try:
                async with s.get(url) as resp:
                    body = await resp.read()
                    good = resp.status == 200 and hashlib.sha256(body).hexdigest() == expected[url]
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                good = False
                if len(out.errors) < 5:
                    out.errors.append(f"{url}: {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.01)  # a refused connection must not spin
            else:
                if not good and len(out.errors) < 5:
                    out.errors.append(f"{url}: status {resp.status}, {len(body)} bytes, sha256 mismatch?")
            if good:
                out.ok += 1
                out.starts.append(t0)
                out.latencies.append(time.monotonic() - t0)
            else:
                out.bad += 1

    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    async with session() as s:
        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(client(s, i) for i in range(conns)))
        await watcher
    return out


def latency_loop(
    urls: list[str], expected: dict[str, str], conns: int, start_at: float, stop_at: float, stop_file: str
) -> Latencies:
    """conns keep-alive clients looping over urls (each body's sha256 checked) until stop."""
    return asyncio.run(_latency_loop(urls, expected, conns, start_at, stop_at, stop_file))


def _ready(_: int) -> int:
    return os.getpid()


class ClientPool:
    """Spawned load-generating processes, kept for the whole run."""

    def __init__(self, procs: int) -> None:
        self.procs = procs
        self._pool: Pool = multiprocessing.get_context("spawn").Pool(procs)
        # Import everything now, so that the first measured job does not pay for it.
        self._pool.map(_ready, range(procs), chunksize=1)

    def split(self, items: list[Any]) -> list[list[Any]]:
        """items dealt round-robin over the processes (no empty share)."""
        shares = [items[i :: self.procs] for i in range(self.procs)]
        return [s for s in shares if s]

    def fetch(self, jobs: list[Fetch]) -> AsyncResult[list[list[Got]]]:
        """Start the jobs, spread over the processes; .get() waits for every Got."""
        return self._pool.map_async(fetch_all, self.split(jobs), chunksize=1)

    def latency(
        self,
        urls: list[str],
        expected: dict[str, str],
        conns: int,
        start_at: float,
        stop_at: float,
        stop_file: str,
    ) -> AsyncResult[list[Latencies]]:
        """Start conns latency clients spread over the processes."""
        per = [conns // self.procs + (1 if i < conns % self.procs else 0) for i in range(self.procs)]
        args = [(urls, expected, c, start_at, stop_at, stop_file) for c in per if c]
        return self._pool.starmap_async(latency_loop, args, chunksize=1)

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()


def fetch_now(jobs: list[Fetch]) -> list[Got]:
    """Run fetches in this process (warm-ups and checks, not measurements)."""
    return fetch_all(jobs)
