"""Size-bounded eviction: least-recently-accessed units go first, pinned packages never.

The cache's size is the sum of its distinct blobs (content-addressed: two channels serving the
same bytes share one blob) plus the catalog file itself, which holds the digests learned from
every cached repodata. Eviction removes catalog rows, oldest access first (fewest hits breaking
ties); a blob is deleted only once no row references it, and the catalog marks it pending
meanwhile so that a crash between the two steps is swept at the next start. A subdir's learned
digests go with its last cached metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.inflight import InflightTable
from condaproxy.cache.removal import delete_released
from condaproxy.cache.unit import Unit
from condaproxy.conda.paths import Kind, package_name
from condaproxy.config.model import CacheConfig
from condaproxy.store.blobstore import BlobStore

log = logging.getLogger(__name__)

BATCH = 500
# A package file name as it appears in a lockfile: the last path segment of a URL (pixi.lock,
# conda-lock.yml) or of an explicit env file line, up to a "#md5"/"#sha256" suffix or quote.
_LOCKED_FILE = re.compile(r"([A-Za-z0-9_+!][A-Za-z0-9._+!-]*\.(?:conda|tar\.bz2))(?=[\s#\"',?]|$)", re.M)
_GLOB_CHARS = frozenset("*?[")


def lockfile_packages(text: str) -> set[str]:
    """Package file names named by a pixi.lock, conda-lock.yml or explicit environment file."""
    return set(_LOCKED_FILE.findall(text))


@dataclass(frozen=True)
class Pins:
    """Package file names and globs exempt from eviction."""

    patterns: tuple[str, ...] = ()
    files: frozenset[str] = frozenset()

    def __contains__(self, filename: object) -> bool:
        if not isinstance(filename, str):
            return False
        if filename in self.files:
            return True
        name = package_name(filename)
        for pattern in self.patterns:
            if _GLOB_CHARS.intersection(pattern):
                if fnmatch.fnmatchcase(filename, pattern):
                    return True
            elif pattern in (filename, name):
                return True
        return False


def _read_lockfile(path: Path) -> tuple[float, set[str]]:
    mtime = path.stat().st_mtime
    return mtime, lockfile_packages(path.read_text(encoding="utf-8", errors="replace"))


@dataclass(frozen=True, slots=True)
class Evicted:
    """What one eviction pass did."""

    units: int
    freed: int  # bytes of blobs deleted
    size: int  # the blobs' size afterwards
    catalog: int  # the catalog's own size afterwards (its file and WAL), also held to max_size


class Evictor:
    """Keeps the store under [cache] max_size; one pass at a time, owned by the application."""

    def __init__(
        self, config: CacheConfig, catalog: Catalog, store: BlobStore, inflight: InflightTable
    ) -> None:
        self.max_size = config.max_size
        self.interval = config.evict_interval
        self._catalog = catalog
        self._store = store
        self._inflight = inflight
        self._patterns = config.pin
        self._lockfile = config.pin_lockfile
        self._lockfile_mtime: float | None = None
        self.pins = Pins(config.pin)
        self.extra_pins = Pins()  # pinned at run time (admin API), kept by cache.pins
        self.evicted_units = 0  # since start
        self.evicted_bytes = 0
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._grown = 0  # bytes persisted since the last pass
        self._last_size = 0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        state = "running" if self._task is not None and not self._task.done() else "idle"
        return f"<Evictor {state} max_size={self.max_size} size≈{self._last_size + self._grown}>"

    def start(self) -> None:
        """Run passes every interval, and soon after a persist pushes the store over max_size."""
        if self._task is not None:
            raise RuntimeError(f"{self!r} already started")
        self._catalog.on_complete = self._completed
        self._wake.set()  # a first pass at once: max_size may have been lowered since the last run
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="evictor")

    async def close(self, grace: float = 10.0) -> None:
        """Let a pass in progress finish its current unit, then stop; safe to call twice."""
        self._stopping = True
        self._wake.set()
        if self._catalog.on_complete == self._completed:
            self._catalog.on_complete = None
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), grace)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _completed(self, unit: Unit) -> None:
        # Called by the catalog for every committed row: cheap, an over-estimate for shared blobs.
        self._grown += unit.size
        if self.max_size and self._last_size + self._grown > self.max_size:
            self._wake.set()

    async def _loop(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self.run_once()
            except Exception as exc:  # the next pass tries again; serving goes on regardless
                log.warning("eviction pass failed: %s", exc)

    async def _refresh_pins(self) -> None:
        lockfile = self._lockfile
        if lockfile is None:
            return
        loop = asyncio.get_running_loop()
        try:
            mtime = await loop.run_in_executor(None, lambda: lockfile.stat().st_mtime)
            if mtime == self._lockfile_mtime:
                return
            mtime, files = await loop.run_in_executor(None, _read_lockfile, lockfile)
        except OSError as exc:
            # Keep the pins already read: a lockfile being rewritten must not unpin everything.
            log.warning("cannot read pin_lockfile %s: %s", lockfile, exc.strerror or exc)
            return
        self._lockfile_mtime = mtime
        self.pins = Pins(self._patterns, frozenset(files))
        log.info("pinned %d packages from %s", len(files), lockfile)

    async def run_once(self, *, dry_run: bool = False) -> Evicted:
        """One pass: evict until blobs and catalog fit in max_size (a no-op when it is unlimited).

        dry_run: remove nothing; count what would go (about: a blob shared by rows that stay
        would not be freed, and the catalog would shrink a little).
        """
        async with self._lock:
            await self._refresh_pins()
            self._grown = 0
            blobs = await self._catalog.stored_size()
            if not self.max_size:
                return Evicted(0, 0, blobs, await self._catalog.catalog_size())
            # Freed pages given back first: the catalog is measured as it can be.
            catalog = await self._catalog.reclaim()
            self._last_size = blobs + catalog
            if blobs + catalog <= self.max_size:
                return Evicted(0, 0, blobs, catalog)
            # Buffered hits count as accesses: flush them so the order below sees them.
            await self._catalog.flush_touches()
            units = freed = skipped = 0
            while blobs + catalog > self.max_size and not self._stopping:
                batch = await self._catalog.eviction_candidates(BATCH, skipped + (units if dry_run else 0))
                if not batch:
                    break
                for cand in batch:
                    if blobs + catalog <= self.max_size or self._stopping:
                        break
                    key = cand.key
                    pinned = key.filename in self.pins or key.filename in self.extra_pins
                    if (key.kind is Kind.PACKAGE and pinned) or self._inflight.get(key):
                        skipped += 1
                        continue
                    if dry_run:
                        units, blobs, freed = units + 1, blobs - cand.size, freed + cand.size
                        log.info("would evict %s (%d bytes)", key, cand.size)
                        continue
                    dropped = await self._catalog.evict(key, cand.blob_key, cand.accessed_at)
                    if dropped.orphan is not None:  # also when a newer put left us the old blob
                        await delete_released(self._catalog, self._store, dropped.orphan)
                        blobs -= cand.size
                        freed += cand.size
                    if not dropped.removed:
                        skipped += 1  # used or replaced since it was chosen: keep it
                        continue
                    units += 1
                    if dropped.forgot:  # a subdir's learned digests went: often most of the catalog
                        catalog = await self._catalog.reclaim()
                # Rows deleted free catalog pages too.
                if not dry_run:
                    catalog = await self._catalog.reclaim()
            if dry_run:
                return Evicted(units, freed, blobs, catalog)
            self._last_size = blobs + catalog
            self.evicted_units += units
            self.evicted_bytes += freed
            if blobs + catalog > self.max_size and not self._stopping:
                log.warning(
                    "cache holds %d bytes (%d of them the catalog), over max_size %d:"
                    " the rest is pinned or in use",
                    blobs + catalog,
                    catalog,
                    self.max_size,
                )
            if units:
                log.info(
                    "evicted %d units, freed %d bytes; cache now %d bytes (catalog %d)",
                    units,
                    freed,
                    blobs + catalog,
                    catalog,
                )
            return Evicted(units, freed, blobs, catalog)
