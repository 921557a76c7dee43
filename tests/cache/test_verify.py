"""A damaged blob is never served as a hit for long: sizes are checked on every read, and
`condaproxy verify` and the periodic scrub re-hash the store and purge what no longer matches.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from channel import Channel, PackageInfo
from proxy import Proxy, check_invariants, make_config, write_config
from upstream import FakeUpstream

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.cpu import CpuPool
from condaproxy.cache.scrub import Scrubber
from condaproxy.cache.verify import verify
from condaproxy.metrics import Metrics
from condaproxy.store.filesystem import FilesystemStore

CH = "/testchan"


def blob_of(cache: Path, pkg: PackageInfo) -> Path:
    return cache / "blobs" / pkg.sha256[:2] / pkg.sha256


def flip_a_byte(path: Path, at: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))  # same size: only a hash can tell


def run_verify(ini: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "condaproxy", "verify", "--config", str(ini)],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def cache_packages(proxy: Proxy, channel: Channel, *names: str) -> list[PackageInfo]:
    pkgs = [channel.by_name(n) for n in names]
    for pkg in pkgs:
        assert (await proxy.get(f"{CH}/{pkg.url_path}")).body == pkg.read_bytes()
    await proxy.idle()
    return pkgs


async def test_a_blob_of_the_wrong_size_is_refetched_on_the_next_read(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    (pkg,) = await cache_packages(proxy, channel, "cp-data")
    blob = blob_of(proxy.config.cache.directory, pkg)
    blob.write_bytes(blob.read_bytes()[:-10])
    again = await proxy.get(f"{CH}/{pkg.url_path}")
    assert again.xcache == "MISS" and again.body == pkg.read_bytes()
    await proxy.idle()
    check_invariants(proxy.config.cache.directory)
    assert upstream.count(f"{CH}/{pkg.url_path}") == 2


async def test_verify_command_purges_a_flipped_blob_so_the_next_get_refetches(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    ini = write_config(tmp_path / "proxy.ini", cache, upstream.url, 8751)
    proxy = await Proxy(make_config(cache, upstream.url)).start()
    try:
        good, bad = await cache_packages(proxy, channel, "cp-base", "cp-tools")
    finally:
        await proxy.close()

    clean = run_verify(ini)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "all intact" in clean.stdout

    flip_a_byte(blob_of(cache, bad))
    found = run_verify(ini)
    assert found.returncode == 1, found.stdout + found.stderr
    assert f"purged testchan/linux-64/{bad.filename}: content hashes to" in found.stdout
    assert good.filename not in found.stdout
    assert not blob_of(cache, bad).exists()
    units = check_invariants(cache)
    assert ("testchan", bad.subdir, bad.filename) not in units
    assert ("testchan", good.subdir, good.filename) in units

    proxy = await Proxy(make_config(cache, upstream.url)).start()
    try:
        refetched = await proxy.get(f"{CH}/{bad.url_path}")
        assert refetched.xcache == "MISS" and refetched.body == bad.read_bytes()
        assert (await proxy.get(f"{CH}/{good.url_path}")).xcache == "HIT"
        await proxy.idle()
    finally:
        await proxy.close()
    assert run_verify(ini).returncode == 0
    check_invariants(cache)


def test_verify_reports_every_kind_of_damage(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "blobs").mkdir(parents=True)
    db = sqlite3.connect(cache / "catalog.sqlite3")
    db.executescript(
        """CREATE TABLE units (channel, subdir, filename, blob_key, sha256, size);
           CREATE TABLE pending (blob_key);"""
    )

    def store(data: bytes) -> str:
        key = hashlib.sha256(data).hexdigest()
        (cache / "blobs" / key[:2]).mkdir(exist_ok=True)
        (cache / "blobs" / key[:2] / key).write_bytes(data)
        return key

    ok = store(b"fine")
    short = store(b"will be cut")
    (cache / "blobs" / short[:2] / short).write_bytes(b"will")
    missing = "ab" * 32
    stray = store(b"nobody's")
    rows = [
        ("c", "noarch", "ok.conda", ok, ok, 4),
        ("c", "noarch", "ok-twin.conda", ok, ok, 4),  # two rows sharing one blob
        ("c", "noarch", "short.conda", short, short, 11),
        ("c", "noarch", "missing.conda", missing, missing, 3),
        ("c", "", "root.json", "not-a-key", "not-a-key", 1),
        ("c", "noarch", "liar.conda", ok, "0" * 64, 4),  # a row whose digest is not its blob's
    ]
    db.executemany("INSERT INTO units VALUES (?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    lines: list[str] = []
    report = verify(cache, lines.append)
    text = "\n".join(lines)
    assert report.units == 6 and report.purged_blobs == 3
    assert sorted(report.purged_units) == [
        "c/noarch/liar.conda",
        "c/noarch/missing.conda",
        "c/noarch/short.conda",
        "c/root.json",
    ]
    assert "blob is 4 bytes, catalog says 11" in text and "blob missing" in text
    assert report.unreferenced == [stray]
    assert "1 unreferenced blobs" in report.summary()
    remaining = sqlite3.connect(cache / "catalog.sqlite3").execute("SELECT filename FROM units").fetchall()
    assert sorted(remaining) == [("ok-twin.conda",), ("ok.conda",)]
    assert not (cache / "blobs" / short[:2] / short).exists()
    # A second pass finds nothing left to purge.
    assert verify(cache, lambda _: None).purged_units == []


def test_verify_of_a_directory_without_catalog_creates_nothing(tmp_path: Path) -> None:
    lines: list[str] = []
    assert verify(tmp_path / "nowhere", lines.append).purged_blobs == 0
    assert "no catalog" in lines[0]
    assert not (tmp_path / "nowhere").exists()


async def test_the_scrub_purges_a_flipped_blob_while_serving(
    proxy_factory, upstream: FakeUpstream, channel: Channel
) -> None:
    proxy: Proxy = await proxy_factory(scrub_interval=1)
    cache = proxy.config.cache.directory
    good, bad = await cache_packages(proxy, channel, "cp-lib", "cp-big")
    flip_a_byte(blob_of(cache, bad), at=12345)
    purged = proxy.services.metrics.scrub_purged
    deadline = time.monotonic() + 15
    while purged._value.get() < 1:
        assert time.monotonic() < deadline, "the scrub never purged the damaged blob"
        # Hits go on meanwhile (the flip keeps the size, so only a hash can tell).
        assert (await proxy.get(f"{CH}/{good.url_path}")).xcache == "HIT"
        await asyncio.sleep(0.2)
    again = await proxy.get(f"{CH}/{bad.url_path}")
    assert again.xcache == "MISS" and again.body == bad.read_bytes()
    await proxy.idle()
    units = check_invariants(cache)
    assert ("testchan", bad.subdir, bad.filename) in units
    assert purged._value.get() == 1


async def test_the_scrub_pages_through_the_catalog(tmp_path: Path) -> None:
    # 2,000 units whose rows carry 16 KB of headers each: 32 MB that a pass must never hold
    # at once (at 500,000 units, loading every row took a gigabyte).
    catalog = await Catalog.open(tmp_path / "catalog.sqlite3")
    store = FilesystemStore(tmp_path / "blobs")
    headers = json.dumps({"X-Filler": "x" * 16384})
    rows = []
    for i in range(2000):
        data = b"blob %d" % i
        sha = hashlib.sha256(data).hexdigest()
        (tmp_path / "blobs" / sha[:2]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "blobs" / sha[:2] / sha).write_bytes(data)
        rows.append(
            (
                "c",
                "noarch",
                f"p{i}-1-0.conda",
                "package",
                "https://up/x",
                "complete",
                sha,
                sha,
                len(data),
                headers,
                None,
                None,
                0.0,
                0.0,
                0.0,
            )
        )
    damaged = rows[1234]
    flip_a_byte(tmp_path / "blobs" / damaged[6][:2] / damaged[6], at=0)
    db = sqlite3.connect(tmp_path / "catalog.sqlite3")
    with db:
        db.executemany(
            """INSERT INTO units (channel, subdir, filename, kind, upstream_url, state, blob_key, sha256,
               size, headers, etag, last_modified, fetched_at, validated_at, accessed_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            rows,
        )
    db.close()
    try:
        tracemalloc.start()
        try:
            cpu = CpuPool(1, 1)
            try:
                purged = await Scrubber(3600, catalog, store, Metrics(), cpu).run_once()
            finally:
                await cpu.close()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert purged == 1
        assert peak < 4 * 1024 * 1024, f"a scrub pass held {peak} bytes"
        assert len(await catalog.all_units()) == 1999
    finally:
        await catalog.close()
    check_invariants(tmp_path)
