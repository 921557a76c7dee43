"""catalog: the SQLite unit catalog (open/migrate, unit rows, orphans, hits, digests)."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.catalog.db import SCHEMA_VERSION
from condaproxy.cache.unit import Unit
from condaproxy.conda.paths import Kind, UnitKey

BLOB_A = "a" * 64
BLOB_B = "b" * 64
BLOB_C = "c" * 64

PKG = UnitKey("conda-forge", "linux-64", "x-1-0.conda", Kind.PACKAGE)
REPO = UnitKey("conda-forge", "noarch", "repodata.json", Kind.REPODATA)
ROOT = UnitKey("pkgs/main", "", "channeldata.json", Kind.OTHER)
SHARD = UnitKey("conda-forge", "noarch", f"shards/{BLOB_C}.msgpack.zst", Kind.SHARD)


def unit(key: UnitKey, blob: str = BLOB_A, **kw: object) -> Unit:
    fields: dict[str, object] = {
        "key": key,
        "upstream_url": f"https://conda.anaconda.org/{key}",
        "blob_key": blob,
        "sha256": blob,
        "size": 123,
        "headers": {"Content-Type": "application/json", "ETag": '"v1"'},
        "etag": '"v1"',
        "last_modified": "Sun, 06 Nov 1994 08:49:37 GMT",
        "fetched_at": 1000.0,
        "validated_at": 1000.0,
    }
    fields.update(kw)
    return Unit(**fields)  # type: ignore[arg-type]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "catalog.db"


@pytest.fixture
async def catalog(db_path: Path) -> AsyncIterator[Catalog]:
    cat = await Catalog.open(db_path)
    try:
        yield cat
    finally:
        await cat.close()


def raw(db_path: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db_path)
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


# -- open / migrate --------------------------------------------------------------------------


async def test_open_creates_schema_in_wal_mode(db_path: Path) -> None:
    cat = await Catalog.open(db_path)
    await cat.close()
    assert raw(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert raw(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert raw(db_path, "PRAGMA auto_vacuum") == [(2,)]  # incremental: eviction gives pages back
    tables = {r[0] for r in raw(db_path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"units", "digests", "pending"} <= tables


async def test_reopen_keeps_data(db_path: Path) -> None:
    cat = await Catalog.open(db_path)
    await cat.complete(unit(PKG))
    await cat.close()
    cat = await Catalog.open(db_path)
    try:
        assert await cat.get(PKG) == unit(PKG)
        assert [u.key for u in await cat.all_units()] == [PKG]
    finally:
        await cat.close()


async def test_newer_schema_is_refused(db_path: Path) -> None:
    cat = await Catalog.open(db_path)
    await cat.complete(unit(PKG))
    await cat.close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        await Catalog.open(db_path)
    # Refusing must not touch the newer database.
    assert raw(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]
    assert raw(db_path, "SELECT count(*) FROM units") == [(1,)]


async def test_open_migrates_an_unversioned_database(db_path: Path) -> None:
    sqlite3.connect(db_path).close()  # an empty file at user_version 0
    cat = await Catalog.open(db_path)
    try:
        await cat.complete(unit(PKG))
        assert await cat.get(PKG) is not None
    finally:
        await cat.close()
    assert raw(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


async def test_open_migrates_a_version_2_catalog(db_path: Path) -> None:
    # Version 2 kept one pending mark per blob, and never gave freed pages back.
    db = sqlite3.connect(db_path)
    db.executescript(
        """PRAGMA journal_mode=WAL;
           CREATE TABLE units (channel TEXT NOT NULL, subdir TEXT NOT NULL, filename TEXT NOT NULL,
               kind TEXT NOT NULL, upstream_url TEXT NOT NULL, state TEXT NOT NULL,
               blob_key TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
               headers TEXT NOT NULL, etag TEXT, last_modified TEXT, fetched_at REAL NOT NULL,
               validated_at REAL NOT NULL, accessed_at REAL NOT NULL, hits INTEGER NOT NULL DEFAULT 0,
               source_blob TEXT, PRIMARY KEY (channel, subdir, filename)) WITHOUT ROWID;
           CREATE INDEX units_blob ON units (blob_key);
           CREATE TABLE pending (blob_key TEXT PRIMARY KEY, since REAL NOT NULL) WITHOUT ROWID;
           PRAGMA user_version=2;"""
    )
    with db:
        db.execute(
            "INSERT INTO units VALUES (?, ?, ?, 'package', 'https://up/x', 'complete', ?, ?, 123, '{}',"
            " NULL, NULL, 1.0, 1.0, 1.0, 0, NULL)",
            (PKG.channel, PKG.subdir, PKG.filename, BLOB_A, BLOB_A),
        )
        db.execute("INSERT INTO pending VALUES (?, 1.0)", (BLOB_B,))
    db.close()
    cat = await Catalog.open(db_path)
    try:
        got = await cat.get(PKG)
        assert got is not None and got.blob_key == BLOB_A
        assert await cat.pending_orphans() == [BLOB_B]
        put = await cat.begin_put(BLOB_C)
        assert put != await cat.begin_put(BLOB_C)
    finally:
        await cat.close()
    assert raw(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert raw(db_path, "PRAGMA auto_vacuum") == [(2,)]  # incremental: freed pages can be given back
    assert raw(db_path, "PRAGMA integrity_check") == [("ok",)]


async def test_close_is_safe_twice(db_path: Path) -> None:
    cat = await Catalog.open(db_path)
    await cat.close()
    await cat.close()


# -- complete / get / revalidated / remove ---------------------------------------------------


async def test_get_missing_is_none(catalog: Catalog) -> None:
    assert await catalog.get(PKG) is None


@pytest.mark.parametrize("key", [PKG, REPO, ROOT, SHARD])
async def test_complete_get_round_trip(db_path: Path, catalog: Catalog, key: UnitKey) -> None:
    u = unit(key, headers={"Content-Type": "x/y", "Cache-Control": "max-age=60", "X-Ünï": "ok"})
    assert await catalog.complete(u) is None
    assert await catalog.get(key) == u
    # The row itself (not only the in-memory cache) holds it: read it from a fresh catalog.
    other = await Catalog.open(db_path)
    try:
        got = await other.get(key)
    finally:
        await other.close()
    assert got == u
    assert got is not None and got.key.kind is key.kind and got.headers == u.headers


async def test_units_are_keyed_by_channel_subdir_and_filename(catalog: Catalog) -> None:
    await catalog.complete(unit(PKG, BLOB_A))
    other_channel = dataclasses.replace(PKG, channel="pkgs/main")
    other_subdir = dataclasses.replace(PKG, subdir="noarch")
    assert await catalog.get(other_channel) is None
    assert await catalog.get(other_subdir) is None
    await catalog.complete(unit(other_channel, BLOB_B))
    assert (await catalog.get(PKG)).blob_key == BLOB_A  # type: ignore[union-attr]
    assert (await catalog.get(other_channel)).blob_key == BLOB_B  # type: ignore[union-attr]


async def test_complete_replacing_returns_the_orphaned_blob(catalog: Catalog) -> None:
    # (A replaced repodata.json keeps its blob as a revision: see test_revisions.py.)
    await catalog.complete(unit(ROOT, BLOB_A))
    assert await catalog.complete(unit(ROOT, BLOB_B, etag='"v2"')) == BLOB_A
    got = await catalog.get(ROOT)
    assert got is not None and got.blob_key == BLOB_B and got.etag == '"v2"'


async def test_complete_with_the_same_blob_orphans_nothing(catalog: Catalog) -> None:
    await catalog.complete(unit(REPO, BLOB_A))
    assert await catalog.complete(unit(REPO, BLOB_A, validated_at=2000.0)) is None


async def test_orphan_only_when_no_other_row_references_it(catalog: Catalog) -> None:
    # Same bytes under two names (e.g. a package mirrored by two channels): one blob.
    await catalog.complete(unit(PKG, BLOB_A))
    twin = dataclasses.replace(PKG, channel="mirror")
    await catalog.complete(unit(twin, BLOB_A))
    assert await catalog.complete(unit(PKG, BLOB_B)) is None  # twin still uses BLOB_A
    assert await catalog.complete(unit(twin, BLOB_C)) == BLOB_A  # now nobody does


async def test_remove(catalog: Catalog) -> None:
    await catalog.complete(unit(PKG, BLOB_A))
    dropped = await catalog.remove(PKG, BLOB_A)
    assert (dropped.keys, dropped.orphan) == ((PKG,), BLOB_A)
    await catalog.blob_deleted(BLOB_A)  # the caller deleted it from the store
    assert await catalog.get(PKG) is None
    assert await catalog.all_units() == []
    assert not (await catalog.remove(PKG, BLOB_A)).removed  # already gone
    assert await catalog.pending_orphans() == []


async def test_remove_names_the_row_version_it_means(catalog: Catalog) -> None:
    # A reader that found the old blob gone after a revalidation replaced it: the new row stays.
    await catalog.complete(unit(ROOT, BLOB_A))
    assert await catalog.complete(unit(ROOT, BLOB_B, etag='"v2"')) == BLOB_A
    await catalog.blob_deleted(BLOB_A)
    dropped = await catalog.remove(ROOT, BLOB_A)
    assert (dropped.removed, dropped.orphan) == (False, None)
    assert await catalog.get(ROOT) == unit(ROOT, BLOB_B, etag='"v2"')


async def test_remove_keeps_a_shared_blob(catalog: Catalog) -> None:
    twin = dataclasses.replace(PKG, channel="mirror")
    await catalog.complete(unit(PKG, BLOB_A))
    await catalog.complete(unit(twin, BLOB_A))
    assert (await catalog.remove(PKG, BLOB_A)).orphan is None
    assert await catalog.get(twin) is not None
    assert (await catalog.remove(twin, BLOB_A)).orphan == BLOB_A


async def test_remove_survives_reopen(db_path: Path, catalog: Catalog) -> None:
    await catalog.complete(unit(PKG))
    await catalog.remove(PKG, BLOB_A)
    other = await Catalog.open(db_path)
    try:
        assert await other.get(PKG) is None
    finally:
        await other.close()


async def test_revalidated_refreshes_validators(db_path: Path, catalog: Catalog) -> None:
    u = unit(REPO)
    await catalog.complete(u)
    fresh = await catalog.revalidated(
        u, {"ETag": '"v2"', "Last-Modified": "Mon, 07 Nov 1994 08:49:37 GMT", "X-New": "1"}, 5000.0
    )
    assert fresh is not None
    assert fresh.validated_at == 5000.0 and fresh.fetched_at == u.fetched_at
    assert fresh.etag == '"v2"' and fresh.last_modified == "Mon, 07 Nov 1994 08:49:37 GMT"
    assert fresh.headers == {
        "Content-Type": "application/json",
        "ETag": '"v2"',
        "Last-Modified": "Mon, 07 Nov 1994 08:49:37 GMT",
        "X-New": "1",
    }
    assert (fresh.blob_key, fresh.sha256, fresh.size) == (u.blob_key, u.sha256, u.size)
    assert await catalog.get(REPO) == fresh
    other = await Catalog.open(db_path)
    try:
        assert await other.get(REPO) == fresh
    finally:
        await other.close()


async def test_revalidated_without_new_validators_keeps_old_ones(catalog: Catalog) -> None:
    u = unit(REPO)
    await catalog.complete(u)
    fresh = await catalog.revalidated(u, {}, 4000.0)
    assert fresh is not None
    assert fresh.etag == u.etag and fresh.last_modified == u.last_modified
    assert fresh.headers == u.headers and fresh.validated_at == 4000.0


async def test_revalidating_a_removed_unit_does_not_resurrect_it(catalog: Catalog) -> None:
    # Eviction may remove the row (and delete its blob) while a conditional GET is in flight.
    u = unit(ROOT)
    await catalog.complete(u)
    assert (await catalog.remove(ROOT, BLOB_A)).orphan == BLOB_A  # caller deletes it from the store
    assert await catalog.revalidated(u, {"ETag": '"v2"'}, 5000.0) is None
    assert await catalog.get(ROOT) is None
    assert await catalog.all_units() == []


async def test_revalidating_a_stale_unit_keeps_cache_and_row_coherent(
    db_path: Path, catalog: Catalog
) -> None:
    old = unit(ROOT, BLOB_A)
    new = unit(ROOT, BLOB_B, etag='"v2"')
    await catalog.complete(old)
    assert await catalog.complete(new) == BLOB_A  # BLOB_A is deleted from the store
    assert await catalog.revalidated(old, {"ETag": '"v1b"'}, 5000.0) is None
    assert await catalog.get(ROOT) == new  # the row was not touched by the stale 304
    other = await Catalog.open(db_path)
    try:
        assert await other.get(ROOT) == new
    finally:
        await other.close()


# -- pending puts ----------------------------------------------------------------------------


async def test_pending_orphans_after_begin_put_without_complete(catalog: Catalog) -> None:
    await catalog.begin_put(BLOB_A)  # crashed mid-persist
    await catalog.begin_put(BLOB_B)
    await catalog.complete(unit(PKG, BLOB_B))  # this one committed
    assert await catalog.pending_orphans() == [BLOB_A]
    assert await catalog.pending_orphans() == []  # cleared


async def test_pending_put_of_a_blob_already_in_use_is_not_an_orphan(catalog: Catalog) -> None:
    await catalog.complete(unit(PKG, BLOB_A))
    await catalog.begin_put(BLOB_A)  # same bytes again under another name, never committed
    assert await catalog.pending_orphans() == []


async def test_pending_survives_reopen(db_path: Path) -> None:
    cat = await Catalog.open(db_path)
    await cat.begin_put(BLOB_C)
    await cat.close()
    cat = await Catalog.open(db_path)
    try:
        assert await cat.pending_orphans() == [BLOB_C]
    finally:
        await cat.close()


async def test_abandon_put(catalog: Catalog) -> None:
    put = await catalog.begin_put(BLOB_A)
    assert await catalog.abandon_put(put) is True  # the caller deletes the blob
    await catalog.blob_deleted(BLOB_A)
    assert await catalog.pending_orphans() == []
    await catalog.complete(unit(PKG, BLOB_B))
    put = await catalog.begin_put(BLOB_B)
    assert await catalog.abandon_put(put) is False  # a row uses it: keep the blob


async def test_each_put_has_its_own_pending_mark(catalog: Catalog) -> None:
    first = await catalog.begin_put(BLOB_A)
    second = await catalog.begin_put(BLOB_A)  # the same bytes through another channel
    assert first != second
    await catalog.complete(unit(PKG, BLOB_A), first)
    assert await catalog.abandon_put(second) is False  # the first put's row uses the blob
    twin = dataclasses.replace(PKG, channel="mirror")
    third, fourth = await catalog.begin_put(BLOB_B), await catalog.begin_put(BLOB_B)
    assert await catalog.abandon_put(third) is False  # the fourth put still needs the blob
    await catalog.complete(unit(twin, BLOB_B), fourth)
    assert await catalog.pending_orphans() == []


# -- hits ------------------------------------------------------------------------------------


def hits(db_path: Path, key: UnitKey) -> tuple[object, ...]:
    return raw(
        db_path,
        "SELECT hits, accessed_at FROM units WHERE channel=? AND subdir=? AND filename=?",
        key.channel,
        key.subdir,
        key.filename,
    )[0]


async def test_touch_and_flush_touches(db_path: Path, catalog: Catalog) -> None:
    await catalog.complete(unit(PKG, BLOB_A))
    await catalog.complete(unit(REPO, BLOB_B))
    assert hits(db_path, PKG)[0] == 0
    catalog.touch(PKG, 2000.0)
    catalog.touch(PKG, 2001.0)
    catalog.touch(REPO, 1500.0)
    assert hits(db_path, PKG)[0] == 0  # buffered, not written per request
    await catalog.flush_touches()
    assert hits(db_path, PKG) == (2, 2001.0)
    assert hits(db_path, REPO) == (1, 1500.0)
    catalog.touch(PKG, 3000.0)
    await catalog.flush_touches()
    await catalog.flush_touches()  # nothing buffered: no double count
    assert hits(db_path, PKG) == (3, 3000.0)


async def test_touch_of_a_missing_unit_is_harmless(catalog: Catalog) -> None:
    catalog.touch(PKG, 1.0)
    await catalog.flush_touches()
    assert await catalog.get(PKG) is None


async def test_close_flushes_touches(db_path: Path) -> None:
    cat = await Catalog.open(db_path)
    await cat.complete(unit(PKG))
    cat.touch(PKG, 7.0)
    await cat.close()
    assert hits(db_path, PKG) == (1, 7.0)


async def test_replacing_a_unit_keeps_its_hits(db_path: Path, catalog: Catalog) -> None:
    await catalog.complete(unit(REPO, BLOB_A))
    catalog.touch(REPO, 2000.0)
    catalog.touch(REPO, 2000.0)
    await catalog.flush_touches()
    await catalog.complete(unit(REPO, BLOB_B))
    assert hits(db_path, REPO)[0] == 2


# -- digests ---------------------------------------------------------------------------------


async def test_expected_from_digests(db_path: Path, catalog: Catalog) -> None:
    conn = sqlite3.connect(db_path)
    conn.executemany(
        "INSERT INTO digests VALUES (?, ?, ?, ?, ?)",
        [
            ("conda-forge", "linux-64", "x-1-0.conda", BLOB_A, 42),
            ("conda-forge", "linux-64", "y-1-0.conda", BLOB_B, None),
            ("pkgs/main", "linux-64", "x-1-0.conda", BLOB_C, 7),
        ],
    )
    conn.commit()
    conn.close()
    assert await catalog.expected("conda-forge", "linux-64", "x-1-0.conda") == (BLOB_A, 42)
    assert await catalog.expected("conda-forge", "linux-64", "y-1-0.conda") == (BLOB_B, None)
    assert await catalog.expected("pkgs/main", "linux-64", "x-1-0.conda") == (BLOB_C, 7)
    assert await catalog.expected("conda-forge", "noarch", "x-1-0.conda") is None
    assert await catalog.expected("conda-forge", "linux-64", "z-1-0.conda") is None
