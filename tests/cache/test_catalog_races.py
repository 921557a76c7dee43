"""Catalog writers under concurrency: transactions that cannot mix, removals that name the row
version they mean, puts counted one by one.

Interleavings are forced, never waited for: a wrapped connection pauses a chosen transaction at
its commit, and a wrapped store pauses a chosen put right after its blob is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import math
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from proxy import check_invariants

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.catalog.db import connect
from condaproxy.cache.evict import Evictor
from condaproxy.cache.inflight import InflightTable
from condaproxy.cache.persist import PersistQueue
from condaproxy.cache.removal import remove_unit
from condaproxy.cache.unit import Unit
from condaproxy.conda.paths import Kind, UnitKey
from condaproxy.config.model import CacheConfig
from condaproxy.metrics import Metrics
from condaproxy.store.filesystem import FilesystemStore

PKG = UnitKey("conda-forge", "linux-64", "x-1-0.conda", Kind.PACKAGE)
OTHER = UnitKey("conda-forge", "noarch", "y-1-0.conda", Kind.PACKAGE)
BLOB_A = "a" * 64
BLOB_B = "b" * 64
BLOB_C = "c" * 64


def unit(key: UnitKey, blob: str, size: int = 123) -> Unit:
    return Unit(key, f"https://up/{key}", blob, blob, size, {"ETag": '"v1"'}, '"v1"', None, 1000.0, 1000.0)


def raw(db_path: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db_path)
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


# --- a connection that pauses a transaction at its commit ---------------------------------


@dataclass
class Gate:
    """Once armed, the next transaction that runs a statement containing `sql` waits at its commit."""

    sql: str
    armed: bool = False
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


class GatedConnection:
    """An aiosqlite connection whose commit waits on a Gate; everything else passes through."""

    def __init__(self, conn: aiosqlite.Connection, gate: Gate) -> None:
        self._conn = conn
        self._gate = gate
        self._matched = False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)  # only the connection's public face is passed through
        return getattr(self._conn, name)

    def execute(self, sql: str, parameters: Any = None) -> Any:
        if self._gate.sql in sql:
            self._matched = True
        return self._conn.execute(sql, parameters)

    async def commit(self) -> None:
        if self._matched and self._gate.armed:
            self._gate.armed = False
            self._gate.reached.set()
            await self._gate.release.wait()
        self._matched = False
        await self._conn.commit()

    async def rollback(self) -> None:
        self._matched = False
        await self._conn.rollback()


def gated(gate: Gate) -> Callable[[Path], Awaitable[aiosqlite.Connection]]:
    async def open_gated(path: Path) -> aiosqlite.Connection:
        return GatedConnection(await connect(path), gate)  # type: ignore[return-value]

    return open_gated


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "catalog.sqlite3"


@pytest.fixture
def gate() -> Gate:
    return Gate("INTO units")


@pytest.fixture
async def catalog(db_path: Path, gate: Gate) -> AsyncIterator[Catalog]:
    cat = await Catalog.open(db_path, connect=gated(gate))
    try:
        yield cat
    finally:
        gate.release.set()
        await cat.close()


# --- 1. one write transaction at a time -----------------------------------------------------


async def test_a_cancelled_writer_cannot_undo_a_completing_row(
    db_path: Path, catalog: Catalog, gate: Gate
) -> None:
    # Cancellation at shutdown (or SQLITE_FULL) rolls a writer back: only its own statements.
    await catalog.complete(unit(OTHER, BLOB_B))
    gate.armed = True
    completing = asyncio.ensure_future(catalog.complete(unit(PKG, BLOB_A)))
    await gate.reached.wait()  # complete() has sent its INSERT and waits at its commit
    evicting = asyncio.ensure_future(catalog.evict(OTHER, BLOB_B, math.inf))
    await asyncio.sleep(0)  # let the eviction start
    evicting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await evicting
    gate.release.set()
    assert await completing is None
    # The row complete() reported is in the database, and so is the one nobody removed.
    assert raw(db_path, "SELECT filename, blob_key FROM units ORDER BY filename") == [
        (PKG.filename, BLOB_A),
        (OTHER.filename, BLOB_B),
    ]
    assert await catalog.get(PKG) == unit(PKG, BLOB_A)


async def test_a_row_is_invisible_until_its_transaction_commits(catalog: Catalog, gate: Gate) -> None:
    gate.armed = True
    completing = asyncio.ensure_future(catalog.complete(unit(PKG, BLOB_A)))
    await gate.reached.wait()
    # The blob may yet be abandoned: neither a look-up nor the hot-row cache may show the row.
    assert await catalog.get(PKG) is None
    gate.release.set()
    await completing
    assert await catalog.get(PKG) == unit(PKG, BLOB_A)


async def test_a_blob_replaced_while_an_eviction_holds_it_is_left_to_that_eviction(
    catalog: Catalog, gate: Gate
) -> None:
    await catalog.complete(unit(PKG, BLOB_A))
    gate.armed = True
    holding = asyncio.ensure_future(catalog.complete(unit(OTHER, BLOB_B)))
    await gate.reached.wait()  # the write lock is taken: what follows queues in this order
    replacing = asyncio.ensure_future(catalog.complete(unit(PKG, BLOB_C)))
    await asyncio.sleep(0)
    evicting = asyncio.ensure_future(catalog.evict(PKG, BLOB_A, math.inf))  # claims BLOB_A at once
    await asyncio.sleep(0)
    gate.release.set()
    await holding
    assert await replacing is None  # BLOB_A is the claimant's to delete, not this put's
    dropped = await evicting
    assert (dropped.removed, dropped.orphan) == (False, BLOB_A)  # the row moved on; the blob goes
    await catalog.blob_deleted(BLOB_A)
    assert await catalog.get(PKG) == unit(PKG, BLOB_C)
    assert await catalog.pending_orphans() == []


# --- a store that pauses a put once its blob is in -----------------------------------------


@dataclass
class Hold:
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


class GatedStore(FilesystemStore):
    """A filesystem store whose put of chosen temp files fails, or pauses once the blob is in."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.holds: dict[Path, Hold] = {}
        self.failing: set[Path] = set()

    async def put(self, key: str, src: Path) -> None:
        if src in self.failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        await super().put(key, src)
        if (hold := self.holds.get(src)) is not None:
            hold.reached.set()
            await hold.release.wait()


@dataclass
class Persisting:
    root: Path
    catalog: Catalog
    store: GatedStore
    queue: PersistQueue
    inflight: InflightTable

    def temp(self, name: str, data: bytes) -> Path:
        path = self.root / "tmp" / name
        path.write_bytes(data)
        return path

    def evictor(self, max_size: int) -> Evictor:
        config = CacheConfig(directory=self.root, max_size=max_size)
        return Evictor(config, self.catalog, self.store, self.inflight)


@pytest.fixture
async def persisting(tmp_path: Path) -> AsyncIterator[Persisting]:
    (tmp_path / "tmp").mkdir()
    catalog = await Catalog.open(tmp_path / "catalog.sqlite3")
    store = GatedStore(tmp_path / "blobs")
    queue = PersistQueue(store, catalog, Metrics(), workers=2)
    inflight = InflightTable(tmp_path / "tmp")
    try:
        yield Persisting(tmp_path, catalog, store, queue, inflight)
    finally:
        for hold in store.holds.values():
            hold.release.set()
        await queue.close()
        await inflight.close()
        await catalog.close()


def package_unit(channel: str, data: bytes) -> Unit:
    sha = hashlib.sha256(data).hexdigest()
    key = UnitKey(channel, "noarch", "same-1-0.conda", Kind.PACKAGE)
    return Unit(key, f"https://up/{key}", sha, sha, len(data), {}, None, None, 0.0, 0.0)


# --- 2. a reader removes only the row version it was given --------------------------------


async def test_a_reader_finding_its_blob_gone_keeps_the_newer_version(persisting: Persisting) -> None:
    # (channeldata.json: a replaced repodata.json would be kept as a revision for views)
    key = UnitKey("c", "", "channeldata.json", Kind.OTHER)

    def version(data: bytes) -> Unit:
        sha = hashlib.sha256(data).hexdigest()
        return Unit(key, f"https://up/{key}", sha, sha, len(data), {}, None, None, 0.0, 0.0)

    old, new = version(b'{"v": 1}'), version(b'{"v": 2}')
    await persisting.queue.persist(old, persisting.temp("old", b'{"v": 1}'))
    # A reader looks the unit up; then a revalidation replaces it (and deletes the old blob).
    assert await persisting.catalog.get(key) == old
    await persisting.queue.persist(new, persisting.temp("new", b'{"v": 2}'))
    # The reader finds its blob gone and drops what it was given: not the newer version.
    assert await remove_unit(persisting.catalog, persisting.store, key, old.blob_key) is False
    assert await persisting.catalog.get(key) == new
    for name in ("old", "new"):
        (persisting.root / "tmp" / name).unlink()
    assert check_invariants(persisting.root) == [("c", "", "channeldata.json")]


# --- 3. every put has its own pending mark --------------------------------------------------


async def test_an_eviction_between_two_puts_of_one_blob_keeps_it(persisting: Persisting) -> None:
    # One package through two channels, two persist workers: the same blob, two puts.
    data = b"the same package bytes"
    first, second = package_unit("a", data), package_unit("b", data)
    one, two = persisting.temp("one", data), persisting.temp("two", data)
    hold = persisting.store.holds[two] = Hold()
    storing = asyncio.ensure_future(persisting.queue.persist(second, two))
    await hold.reached.wait()  # the second put's blob is in the store, its row not yet
    await persisting.queue.persist(first, one)
    # The evictor takes the first row; the second put still relies on the blob.
    await persisting.evictor(max_size=1).run_once()
    hold.release.set()
    await storing
    one.unlink()
    two.unlink()
    assert check_invariants(persisting.root) == [("b", "noarch", "same-1-0.conda")]


async def test_a_failed_put_leaves_the_blob_another_put_relies_on(persisting: Persisting) -> None:
    data = b"the same package bytes"
    first, second = package_unit("a", data), package_unit("b", data)
    one, two = persisting.temp("one", data), persisting.temp("two", data)
    hold = persisting.store.holds[two] = Hold()
    persisting.store.failing.add(one)
    storing = asyncio.ensure_future(persisting.queue.persist(second, two))
    await hold.reached.wait()
    with pytest.raises(OSError):
        await persisting.queue.persist(first, one)  # abandoned: the blob is not its alone
    hold.release.set()
    await storing
    one.unlink()
    two.unlink()
    assert check_invariants(persisting.root) == [("b", "noarch", "same-1-0.conda")]
