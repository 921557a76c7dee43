"""Prefetch jobs started through the admin API: every package of a posted lock file is fetched
into the cache (bounded concurrency), checked against the lock file's sha256, and optionally
pinned. Jobs belong to the application, which cancels them at shutdown; their progress is shown
on the status page."""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.download import Fetcher
from condaproxy.cache.pins import RuntimePins
from condaproxy.conda.lockfiles import Locked, Lockfile
from condaproxy.config.channelmap import Mapped, map_url
from condaproxy.config.model import ChannelConfig, Config
from condaproxy.errors import CondaproxyError

log = logging.getLogger(__name__)

CONCURRENCY = 4
KEPT = 20  # finished jobs shown on the status page
Admit = Callable[[ChannelConfig, str | None], Awaitable[ChannelConfig]]


class JobState(enum.StrEnum):
    """A prefetch job's lifecycle."""

    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


@dataclass(eq=False)
class PrefetchJob:
    """One lock file being fetched into the cache."""

    id: int
    source: str  # the lock file's format
    total: int
    pin: bool
    started: float = field(default_factory=time.time)
    state: JobState = JobState.RUNNING
    fetched: int = 0
    cached: int = 0
    bytes: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    finished: float | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def done(self) -> int:
        """Packages dealt with so far."""
        return self.fetched + self.cached + len(self.failed)

    def as_dict(self) -> dict[str, object]:
        """What the status page and the admin API show."""
        return {
            "id": self.id,
            "source": self.source,
            "state": self.state.value,
            "total": self.total,
            "done": self.done,
            "fetched": self.fetched,
            "cached": self.cached,
            "failed": [{"file": f, "reason": r} for f, r in self.failed[:50]],
            "failed_count": len(self.failed),
            "bytes": self.bytes,
            "pin": self.pin,
            "started": self.started,
            "finished": self.finished,
        }


class Prefetcher:
    """Runs prefetch jobs; owned by the application."""

    def __init__(
        self,
        config: Callable[[], Config],
        catalog: Catalog,
        fetcher: Fetcher,
        admit: Admit,
        pins: RuntimePins,
    ) -> None:
        self._config = config  # the current configuration (channel sections may be reloaded)
        self._catalog = catalog
        self._fetcher = fetcher
        self._admit = admit
        self._pins = pins
        self._ids = itertools.count(1)
        self.jobs: deque[PrefetchJob] = deque(maxlen=KEPT)
        self._running: set[PrefetchJob] = set()

    def start(self, lockfile: Lockfile, *, pin: bool = False) -> PrefetchJob:
        """Start fetching every package of lockfile; returns the job at once."""
        job = PrefetchJob(next(self._ids), lockfile.format, len(lockfile.packages), pin)
        self.jobs.append(job)
        self._running.add(job)
        job.task = asyncio.get_running_loop().create_task(self._run(job, lockfile), name=f"prefetch {job.id}")
        job.task.add_done_callback(lambda _: self._running.discard(job))
        return job

    async def close(self) -> None:
        """Cancel running jobs and wait for them; safe to call twice."""
        tasks = [j.task for j in self._running if j.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, job: PrefetchJob, lockfile: Lockfile) -> None:
        limit = asyncio.Semaphore(CONCURRENCY)
        pinned: list[str] = []

        async def one(locked: Locked) -> None:
            async with limit:
                reason = await self._one(job, locked)
            if reason is not None:
                job.failed.append((locked.filename, reason))
            elif job.pin:
                pinned.append(locked.filename)

        try:
            await asyncio.gather(*(one(p) for p in lockfile.packages))
            if pinned:
                await self._pins.change(add=pinned)
            job.state = JobState.DONE
        except asyncio.CancelledError:
            job.state = JobState.CANCELLED
            raise
        finally:
            job.finished = time.time()
            log.info(
                "prefetch %d %s: %d fetched, %d already cached, %d failed",
                job.id,
                job.state.value,
                job.fetched,
                job.cached,
                len(job.failed),
            )

    async def _one(self, job: PrefetchJob, locked: Locked) -> str | None:
        """Fetch one package; None when it is in the cache and matches the lock file, else why not."""
        config = self._config()
        mapped = map_url(config, locked.url)
        if not isinstance(mapped, Mapped):
            return mapped
        key = mapped.key
        channel = config.channel(key.channel)
        if channel is None:
            return f"channel {key.channel} is not served by this proxy"
        unit = await self._catalog.get(key)
        fetched = unit is None
        if unit is None:
            try:
                channel = await self._admit(channel, mapped.token)
                unit = await self._fetcher.ensure(key, channel)
            except CondaproxyError as exc:
                return str(exc)
            if unit is None:
                return "not cached: the upstream failed or the channel's metadata does not list it"
        if locked.sha256 is not None and unit.sha256 != locked.sha256:
            return f"sha256 {unit.sha256[:12]}... differs from the lock file's {locked.sha256[:12]}..."
        if fetched:
            job.fetched += 1
            job.bytes += unit.size
        else:
            job.cached += 1
        return None
