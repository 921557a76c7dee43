"""Retention: cached packages outlive their upstream; size-bounded eviction keeps pins and invariants."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from channel import Channel
from proxy import Proxy, check_invariants
from upstream import FakeUpstream

from condaproxy.app import EVICTOR
from condaproxy.cache import learning
from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.evict import Evictor, Pins, lockfile_packages
from condaproxy.cache.housekeeping import sweep
from condaproxy.cache.inflight import Download, InflightTable
from condaproxy.cache.unit import Unit
from condaproxy.conda.paths import Kind, UnitKey
from condaproxy.config.load import load_config
from condaproxy.config.model import CacheConfig
from condaproxy.errors import ConfigError
from condaproxy.store.filesystem import FilesystemStore

# --- a package once cached stays servable -------------------------------------------------


async def test_cached_package_survives_upstream_deletion(
    proxy_factory: Callable[..., Awaitable[Proxy]], upstream: FakeUpstream, channel: Channel
) -> None:
    proxy = await proxy_factory(repodata_ttl=0)
    pkg = channel.by_name("cp-lib", "1.1")
    path = f"/testchan/{pkg.url_path}"
    assert (await proxy.get(path)).status == 200
    await proxy.idle()
    # Upstream deletes the package and drops it from its metadata: packages are never revalidated.
    upstream.status(path, 404)
    upstream.status(f"/testchan/{pkg.subdir}/repodata.json", 404)
    for _ in range(2):
        resp = await proxy.get(path)
        assert (resp.status, resp.xcache, resp.body) == (200, "HIT", pkg.read_bytes())
    assert upstream.count(path) == 1
    check_invariants(proxy.config.cache.directory)


# --- the evictor on a real catalog and store ----------------------------------------------


@dataclass
class Parts:
    catalog: Catalog
    store: FilesystemStore
    inflight: InflightTable
    root: Path
    catalog_bytes: int = 0  # the catalog's size as add() last left it

    def evictor(
        self, max_size: int, pin: tuple[str, ...] = (), lockfile: Path | None = None, *, blobs: bool = True
    ) -> Evictor:
        """An evictor; blobs=True: max_size is for the blobs, on top of the catalog as it stands."""
        if max_size and blobs:
            max_size += self.catalog_bytes
        config = CacheConfig(directory=self.root, max_size=max_size, pin=pin, pin_lockfile=lockfile)
        return Evictor(config, self.catalog, self.store, self.inflight)

    async def add(
        self, filename: str, data: bytes, accessed: float, *, channel: str = "c", hits: int = 1
    ) -> Unit:
        """Persist a unit the way the persist queue does, then set its access time and hits."""
        sha = hashlib.sha256(data).hexdigest()
        key = UnitKey(
            channel, "noarch", filename, Kind.PACKAGE if filename.endswith(".conda") else Kind.REPODATA
        )
        src = self.root / "tmp" / sha
        src.write_bytes(data)
        put = await self.catalog.begin_put(sha)
        await self.store.put(sha, src)
        unit = Unit(key, f"https://up/{key}", sha, sha, len(data), {}, None, None, 0.0, 0.0)
        await self.catalog.complete(unit, put)
        src.unlink()  # as a finished download's temp file is
        for _ in range(hits):
            self.catalog.touch(key, accessed)
        await self.catalog.flush_touches()
        self.catalog_bytes = await self.catalog.reclaim()
        return unit

    async def names(self) -> set[str]:
        return {u.key.filename for u in await self.catalog.all_units()}


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    (tmp_path / "tmp").mkdir()
    catalog = await Catalog.open(tmp_path / "catalog.sqlite3")
    store = FilesystemStore(tmp_path / "blobs")
    inflight = InflightTable(tmp_path / "tmp")
    try:
        yield Parts(catalog, store, inflight, tmp_path)
    finally:
        await inflight.close()
        await catalog.close()


def blob_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "blobs").glob("??/*"))


async def test_least_recently_accessed_go_first_until_under_the_limit(parts: Parts) -> None:
    for i in range(5):
        await parts.add(f"p{i}-1-0.conda", bytes([i]) * 100, accessed=1000.0 + i)
    result = await parts.evictor(max_size=250).run_once()
    assert await parts.names() == {"p3-1-0.conda", "p4-1-0.conda"}
    assert (result.units, result.freed, result.size) == (3, 300, 200)
    assert blob_bytes(parts.root) == 200 == await parts.catalog.stored_size()
    check_invariants(parts.root)


async def test_ties_in_access_time_are_broken_by_hits(parts: Parts) -> None:
    await parts.add("popular-1-0.conda", b"a" * 100, accessed=1000.0, hits=9)
    await parts.add("rare-1-0.conda", b"b" * 100, accessed=1000.0, hits=1)
    await parts.evictor(max_size=150).run_once()
    assert await parts.names() == {"popular-1-0.conda"}


async def test_unlimited_never_evicts(parts: Parts) -> None:
    for i in range(3):
        await parts.add(f"p{i}-1-0.conda", bytes([i]) * 100, accessed=1000.0 + i)
    assert (await parts.evictor(max_size=0).run_once()).units == 0
    assert len(await parts.names()) == 3


async def test_pins_by_glob_name_and_file_are_honoured(parts: Parts) -> None:
    await parts.add("numpy-1.26-py_0.conda", b"n" * 100, accessed=1.0)
    await parts.add("python-3.12.1-h_0.conda", b"p" * 100, accessed=2.0)
    await parts.add("zlib-1.3-h_0.conda", b"z" * 100, accessed=3.0)
    await parts.add("other-1-0.conda", b"o" * 100, accessed=4.0)
    pins = ("numpy-*", "python", "zlib-1.3-h_0.conda")
    result = await parts.evictor(max_size=100, pin=pins).run_once()
    # Everything pinned stays, even over the limit; the rest goes.
    assert await parts.names() == {"numpy-1.26-py_0.conda", "python-3.12.1-h_0.conda", "zlib-1.3-h_0.conda"}
    assert result.size == 300
    check_invariants(parts.root)


async def test_pins_apply_to_packages_only(parts: Parts) -> None:
    await parts.add("repodata.json", b"{}" * 50, accessed=1.0)
    await parts.add("keep-1-0.conda", b"k" * 100, accessed=2.0)
    await parts.evictor(max_size=100, pin=("*",)).run_once()
    assert await parts.names() == {"keep-1-0.conda"}


def test_pin_matching() -> None:
    pins = Pins(("numpy-*", "python"), frozenset({"zlib-1.3-h_0.tar.bz2"}))
    assert "numpy-2.0-py_0.conda" in pins
    assert "python-3.12.1-h_0.conda" in pins
    assert "python-dateutil-2.9-py_0.conda" not in pins  # a bare name is the package name, exactly
    assert "zlib-1.3-h_0.tar.bz2" in pins
    assert "zlib-1.3-h_1.tar.bz2" not in pins


LOCKFILES = {
    "pixi.lock": """\
version: 6
environments:
  default:
    packages:
      linux-64:
      - conda: https://conda.anaconda.org/conda-forge/linux-64/numpy-2.0.0-py312h22e1c76_0.conda
      - conda: https://conda.anaconda.org/conda-forge/noarch/tzdata-2024a-h0c530f3_0.conda
packages:
- conda: https://conda.anaconda.org/conda-forge/linux-64/numpy-2.0.0-py312h22e1c76_0.conda
  sha256: 8f1a5ed1d1a7
""",
    "conda-lock.yml": """\
package:
- name: bzip2
  url: https://conda.anaconda.org/conda-forge/linux-64/bzip2-1.0.8-hd590300_5.tar.bz2
  hash:
    md5: 69b8b6202a07720f448be700e300ccf4
- name: "python"
  url: "https://conda.anaconda.org/conda-forge/linux-64/python-3.12.1-hab00c5b_1_cpython.conda"
""",
    "explicit.txt": """\
# platform: linux-64
@EXPLICIT
https://conda.anaconda.org/conda-forge/linux-64/libzlib-1.2.13-hd590300_5.conda#f36c115f1ee199da648e0597ec2047ad
https://repo.anaconda.com/pkgs/main/noarch/tzdata-2024a-h04d1e81_0.conda
""",
}


def test_lockfile_package_names() -> None:
    assert lockfile_packages(LOCKFILES["pixi.lock"]) == {
        "numpy-2.0.0-py312h22e1c76_0.conda",
        "tzdata-2024a-h0c530f3_0.conda",
    }
    assert lockfile_packages(LOCKFILES["conda-lock.yml"]) == {
        "bzip2-1.0.8-hd590300_5.tar.bz2",
        "python-3.12.1-hab00c5b_1_cpython.conda",
    }
    assert lockfile_packages(LOCKFILES["explicit.txt"]) == {
        "libzlib-1.2.13-hd590300_5.conda",
        "tzdata-2024a-h04d1e81_0.conda",
    }


async def test_lockfile_pins_are_read_and_reread_when_it_changes(parts: Parts) -> None:
    lock = parts.root / "pixi.lock"
    lock.write_text(LOCKFILES["pixi.lock"])
    await parts.add("numpy-2.0.0-py312h22e1c76_0.conda", b"n" * 100, accessed=1.0)
    await parts.add("bzip2-1.0.8-hd590300_5.tar.bz2", b"b" * 100, accessed=2.0)
    await parts.add("new-1-0.conda", b"x" * 100, accessed=3.0)
    evictor = parts.evictor(max_size=250, lockfile=lock)
    await evictor.run_once()
    assert await parts.names() == {"numpy-2.0.0-py312h22e1c76_0.conda", "new-1-0.conda"}
    # The environment moves on: numpy is no longer locked, so it is the oldest unpinned unit.
    lock.write_text(LOCKFILES["conda-lock.yml"])
    await parts.add("more-1-0.conda", b"m" * 100, accessed=4.0)
    await evictor.run_once()
    assert await parts.names() == {"new-1-0.conda", "more-1-0.conda"}
    check_invariants(parts.root)


async def test_a_unit_in_flight_is_never_evicted(parts: Parts) -> None:
    unit = await parts.add("busy-1-0.conda", b"b" * 100, accessed=1.0)
    await parts.add("idle-1-0.conda", b"i" * 100, accessed=2.0)
    release = asyncio.Event()

    async def run(dl: Download) -> None:
        await release.wait()

    parts.inflight.start(unit.key, run)
    await parts.evictor(max_size=100).run_once()
    assert await parts.names() == {"busy-1-0.conda"}
    release.set()


async def test_a_shared_blob_counts_once_and_outlives_its_first_row(parts: Parts) -> None:
    await parts.add("same-1-0.conda", b"s" * 100, accessed=1.0, channel="a")
    await parts.add("same-1-0.conda", b"s" * 100, accessed=2.0, channel="b")
    await parts.add("other-1-0.conda", b"o" * 100, accessed=3.0)
    assert await parts.catalog.stored_size() == 200
    assert blob_bytes(parts.root) == 200
    # Dropping row a frees nothing (row b still uses the blob), so the evictor goes on to b.
    result = await parts.evictor(max_size=150).run_once()
    assert (result.units, result.freed) == (2, 100)
    assert await parts.names() == {"other-1-0.conda"}
    check_invariants(parts.root)


async def test_a_unit_used_since_it_was_chosen_is_kept(parts: Parts) -> None:
    unit = await parts.add("p-1-0.conda", b"p" * 100, accessed=1.0)
    [cand] = await parts.catalog.eviction_candidates(10)
    parts.catalog.touch(unit.key, time.time())  # a hit, not yet flushed
    assert not (await parts.catalog.evict(cand.key, cand.blob_key, cand.accessed_at)).removed
    await parts.catalog.flush_touches()
    # Replaced by other bytes meanwhile: the choice no longer holds either.
    await parts.add("p-1-0.conda", b"q" * 100, accessed=1.0)
    assert not (await parts.catalog.evict(cand.key, cand.blob_key, cand.accessed_at)).removed
    assert await parts.names() == {"p-1-0.conda"}


async def test_a_put_of_a_blob_being_deleted_waits_for_the_delete(parts: Parts) -> None:
    unit = await parts.add("p-1-0.conda", b"p" * 100, accessed=1.0)
    dropped = await parts.catalog.evict(unit.key, unit.blob_key, 1.0)
    assert (dropped.removed, dropped.orphan) == (True, unit.blob_key)
    put = asyncio.ensure_future(parts.catalog.begin_put(unit.blob_key))
    await asyncio.sleep(0.05)
    assert not put.done(), "a put must not trust a blob that is about to be deleted"
    await parts.store.delete(unit.blob_key)
    await parts.catalog.blob_deleted(unit.blob_key)
    await parts.catalog.abandon_put(await asyncio.wait_for(put, 5))


async def test_a_crash_between_row_and_blob_is_swept_at_start(parts: Parts) -> None:
    unit = await parts.add("p-1-0.conda", b"p" * 100, accessed=1.0)
    assert (await parts.catalog.evict(unit.key, unit.blob_key, 1.0)).orphan == unit.blob_key
    # The process dies here: the blob was never deleted, but it is marked pending.
    await parts.catalog.close()
    parts.catalog = await Catalog.open(parts.root / "catalog.sqlite3")
    assert await parts.catalog.pending_orphans() == [unit.blob_key]


# --- what was learned from a subdir's metadata goes with it ----------------------------------


def repodata(packages: int, seed: int = 0) -> bytes:
    records = {f"p{i}-1-0.tar.bz2": {"sha256": f"{i + seed:064x}", "size": i} for i in range(packages)}
    return json.dumps({"info": {"subdir": "noarch"}, "packages": records}).encode()


def learned(root: Path, channel: str, tables: tuple[str, ...] = ("digests",)) -> int:
    db = sqlite3.connect(root / "catalog.sqlite3")
    try:
        return sum(
            db.execute(f"SELECT count(*) FROM {t} WHERE channel=?", (channel,)).fetchone()[0] for t in tables
        )
    finally:
        db.close()


BASES = ("shard_bases", "package_bases")


async def learn(parts: Parts, channel: str, data: bytes) -> None:
    path = parts.root / "tmp" / "learn-from.json"
    path.write_bytes(data)
    await asyncio.to_thread(
        learning.learn, parts.root / "catalog.sqlite3", channel, "noarch", "repodata.json", path
    )
    path.unlink()


async def test_evicting_a_subdirs_last_metadata_forgets_what_was_learned_from_it(parts: Parts) -> None:
    data = repodata(3)
    full = await parts.add("repodata.json", data, accessed=1.0)
    current = await parts.add("current_repodata.json", data + b" ", accessed=2.0)
    await parts.add("repodata.json", data, accessed=3.0, channel="d")
    await learn(parts, "c", data)
    await learn(parts, "d", data)
    await parts.catalog.set_package_base("c", "noarch", "https://cdn.example/c/noarch/")
    await parts.catalog.set_shard_base("c", "noarch", "https://cdn.example/c/shards/")
    await parts.catalog.evict(full.key, full.blob_key, math.inf)
    assert learned(parts.root, "c") == 3  # current_repodata.json still describes the subdir
    await parts.catalog.evict(current.key, current.blob_key, math.inf)
    assert learned(parts.root, "c") == 0
    assert learned(parts.root, "d") == 3  # another channel's subdir keeps its own
    # Bases are recorded before the document naming them is stored: they go at the next start.
    assert learned(parts.root, "c", BASES) == 2
    await sweep(parts.catalog, parts.store)
    assert learned(parts.root, "c", BASES) == 0
    assert learned(parts.root, "d") == 3


async def test_max_size_bounds_the_catalog_too(parts: Parts) -> None:
    # Ten channels' repodata once left 900,000 digest rows (101 MiB) under max_size = 1M.
    limit = 1024 * 1024
    for channel in ("c", "d"):
        await parts.add("repodata.json", b"{}", accessed=1.0, channel=channel)
        await learn(parts, channel, repodata(20_000, seed=1 if channel == "d" else 0))
    await parts.evictor(max_size=limit, blobs=False).run_once()
    assert await parts.names() == set()
    assert learned(parts.root, "c") == learned(parts.root, "d") == 0
    on_disk = sum(p.stat().st_size for p in parts.root.glob("catalog.sqlite3*"))
    assert on_disk <= limit


async def test_learned_rows_of_subdirs_without_metadata_go_at_start(parts: Parts) -> None:
    # A catalog from before learned rows were dropped with their metadata: swept on the next start.
    await parts.add("repodata.json", b"{}", accessed=1.0, channel="d")
    await learn(parts, "d", repodata(3))
    db = sqlite3.connect(parts.root / "catalog.sqlite3")
    with db:
        db.executemany(
            "INSERT INTO digests VALUES ('c', 'noarch', ?, ?, 1)",
            [(f"q{i}.conda", "0" * 64) for i in range(5)],
        )
        db.execute("INSERT INTO package_bases VALUES ('c', 'noarch', 'https://cdn.example/')")
    db.close()
    await sweep(parts.catalog, parts.store)
    assert learned(parts.root, "c", ("digests", *BASES)) == 0
    assert learned(parts.root, "d") == 3


async def test_nothing_is_learned_for_a_subdir_whose_metadata_went(parts: Parts) -> None:
    # Digests are learned after the metadata is persisted; an eviction may come in between.
    unit = await parts.add("repodata.json", b"{}", accessed=1.0)
    await parts.catalog.evict(unit.key, unit.blob_key, math.inf)
    await learn(parts, "c", repodata(3))
    assert learned(parts.root, "c") == 0


# --- end to end: the app's evictor -------------------------------------------------------


async def test_proxy_stays_under_max_size_after_persisting(
    proxy_factory: Callable[..., Awaitable[Proxy]], upstream: FakeUpstream, channel: Channel
) -> None:
    limit = 8 * 1024 * 1024
    # A long interval: only the wake-up after persisting can bring the store back under the limit.
    proxy = await proxy_factory(max_size=limit, evict_interval=3600.0)
    order = [channel.by_name(n) for n in ("cp-data", "cp-tools", "cp-big")]
    for pkg in order:
        resp = await proxy.get(f"/testchan/{pkg.url_path}")
        assert (resp.status, resp.body) == (200, pkg.read_bytes())
        await proxy.idle()
    catalog = proxy.services.catalog
    deadline = time.monotonic() + 10
    while await catalog.stored_size() > limit:
        assert time.monotonic() < deadline, "the evictor did not run after persisting"
        await asyncio.sleep(0.05)
    await proxy.app[EVICTOR].run_once()  # wait out a pass that may still be finishing
    cached = {f for _, _, f in check_invariants(proxy.config.cache.directory)}
    assert order[2].filename in cached  # the newest stays
    assert order[0].filename not in cached  # the least recently used went first
    assert blob_bytes(proxy.config.cache.directory) <= limit
    # An evicted package is simply fetched again.
    again = await proxy.get(f"/testchan/{order[0].url_path}")
    assert (again.status, again.xcache, again.body) == (200, "MISS", order[0].read_bytes())
    await proxy.idle()


async def test_proxy_keeps_pinned_packages(
    proxy_factory: Callable[..., Awaitable[Proxy]], channel: Channel
) -> None:
    limit = 8 * 1024 * 1024
    proxy = await proxy_factory(max_size=limit, pin=("cp-data-*",))
    for name in ("cp-data", "cp-tools", "cp-big"):
        assert (await proxy.get(f"/testchan/{channel.by_name(name).url_path}")).status == 200
        await proxy.idle()
    await proxy.app[EVICTOR].run_once()
    cached = {f for _, _, f in check_invariants(proxy.config.cache.directory)}
    assert channel.by_name("cp-data").filename in cached
    assert channel.by_name("cp-tools").filename not in cached
    assert await proxy.services.catalog.stored_size() <= limit
    hit = await proxy.get(f"/testchan/{channel.by_name('cp-data').url_path}")
    assert hit.xcache == "HIT"


async def test_a_lowered_max_size_applies_at_start(
    proxy_factory: Callable[..., Awaitable[Proxy]], channel: Channel, tmp_path: Path
) -> None:
    cache = tmp_path / "shared-cache"
    first = await proxy_factory(cache_dir=cache)
    for name in ("cp-data", "cp-tools", "cp-big"):
        assert (await first.get(f"/testchan/{channel.by_name(name).url_path}")).status == 200
        await first.idle()
    await first.close()
    limit = 4 * 1024 * 1024
    second = await proxy_factory(cache_dir=cache, max_size=limit, evict_interval=3600.0)
    deadline = time.monotonic() + 10
    while await second.services.catalog.stored_size() > limit:
        assert time.monotonic() < deadline, "no pass ran at start"
        await asyncio.sleep(0.05)
    await second.app[EVICTOR].run_once()
    assert blob_bytes(cache) <= limit
    check_invariants(cache)


# --- configuration -----------------------------------------------------------------------


def test_config_keys(tmp_path: Path) -> None:
    lock = tmp_path / "pixi.lock"
    lock.write_text(LOCKFILES["pixi.lock"])
    ini = tmp_path / "proxy.ini"
    ini.write_text(
        "[cache]\nmax_size = 20G\nevict_interval = 5\npin = numpy-*, python\n  zlib\npin_lockfile = pixi.lock\n"
    )
    with pytest.raises(ConfigError):  # a continuation line is refused, as everywhere
        load_config(ini)
    ini.write_text(
        "[cache]\nmax_size = 20G\nevict_interval = 5\npin = numpy-*, python zlib\npin_lockfile = pixi.lock\n"
    )
    cache = load_config(ini).cache
    assert cache.max_size == 20 * 1024**3
    assert cache.evict_interval == 5.0
    assert cache.pin == ("numpy-*", "python", "zlib")
    assert cache.pin_lockfile == lock
    for text, value in (
        ("0", 0),
        ("1024", 1024),
        ("512k", 512 * 1024),
        ("3 M", 3 * 1024**2),
        ("1T", 1024**4),
    ):
        ini.write_text(f"[cache]\nmax_size = {text}\n")
        assert load_config(ini).cache.max_size == value
    ini.write_text("[cache]\npin_lockfile =\n")
    assert load_config(ini).cache.pin_lockfile is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_size", "1.5G"),
        ("max_size", "-1"),
        ("max_size", "10 GB"),
        ("evict_interval", "0"),
        ("pin", "numpy/*"),
        ("pin_lockfile", "missing.lock"),
    ],
)
def test_bad_config_values_name_the_key(tmp_path: Path, key: str, value: str) -> None:
    ini = tmp_path / "proxy.ini"
    ini.write_text(f"[cache]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as err:
        load_config(ini)
    assert (err.value.file, err.value.section, err.value.key) == (str(ini), "cache", key)


def test_lockfile_fixture_is_plain_json_free_text() -> None:
    # Not every lockfile is YAML: the parser only looks for URLs and file names.
    text = json.dumps({"url": "https://x/conda-forge/noarch/a-1-0.conda"})
    assert lockfile_packages(text) == {"a-1-0.conda"}
