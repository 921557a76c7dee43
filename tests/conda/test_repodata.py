"""repodata: learning package digests from repodata (any encoding) and CEP-16 shards."""

from __future__ import annotations

import asyncio
import bz2
import gzip
import json
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zstandard

from condaproxy.cache import learning
from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.unit import Unit
from condaproxy.conda import decoding, digests, paths, shards
from condaproxy.conda.shards import read_shard_index
from condaproxy.errors import RefusedDocument


def sha(n: int) -> str:
    return f"{n:064x}"


SHA_A = sha(0xA)
SHA_B = sha(0xB)
SHA_C = sha(0xC)
NESTED = "f" * 64

REPODATA: dict[str, Any] = {
    "info": {"subdir": "linux-64", "base_url": "https://elsewhere.example/pkgs", "sha256": NESTED},
    "packages": {
        "a-1.0-h0_0.tar.bz2": {
            "name": "a",
            "version": "1.0",
            "build": "h0_0",
            "depends": ["python >=3.8", "b 1.*"],
            "constrains": [],
            "md5": "0" * 32,
            "size": 1234,
            "sha256": SHA_A.upper(),  # stored lowercase
            "extra": {"sha256": NESTED, "size": 999, "nested": {"sha256": NESTED}},
            "files": [{"sha256": NESTED, "size": 1}],
        },
        "nosha-1.0-0.tar.bz2": {"name": "nosha", "md5": "1" * 32, "size": 5},
    },
    "packages.conda": {
        "b-2.0-py311_0.conda": {
            # Nested digest first: only the record's own field counts, whatever the order.
            "meta": {"sha256": NESTED},
            "sha256": SHA_B,
            "depends": [],
            "timestamp": 1700000000000,
        },
        "c-1!3.0+x-hABC_1.conda": {"sha256": SHA_C, "size": 3.0, "license": "BSD"},
    },
    "removed": ["old-0.1-0.tar.bz2"],
    "repodata_version": 1,
}

EXPECTED = {
    ("a-1.0-h0_0.tar.bz2", SHA_A, 1234),
    ("b-2.0-py311_0.conda", SHA_B, None),
    ("c-1!3.0+x-hABC_1.conda", SHA_C, 3),
}


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Path]:
    path = tmp_path / "catalog.db"
    catalog = await Catalog.open(path)
    # Digests are learned only for a subdir with metadata cached: each subdir used here has one.
    for channel, subdir in (("conda-forge", "linux-64"), ("pkgs/main", "noarch"), ("c", "noarch")):
        key = paths.UnitKey(channel, subdir, "repodata.json", paths.Kind.REPODATA)
        await catalog.complete(
            Unit(key, f"https://up/{key}", "0" * 64, "0" * 64, 2, {}, None, None, 0.0, 0.0)
        )
    await catalog.close()
    yield path


def rows(db_path: Path) -> set[tuple[str, str, str, str, int | None]]:
    conn = sqlite3.connect(db_path)
    try:
        return set(conn.execute("SELECT channel, subdir, filename, sha256, size FROM digests"))
    finally:
        conn.close()


def expected_rows(channel: str = "conda-forge", subdir: str = "linux-64") -> set[tuple[Any, ...]]:
    return {(channel, subdir, fn, digest, size) for fn, digest, size in EXPECTED}


def write(path: Path, data: bytes) -> Path:
    if path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    elif path.name.endswith(".bz2"):
        data = bz2.compress(data)
    elif path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_shard(path: Path, obj: Any) -> Path:
    path.write_bytes(zstandard.ZstdCompressor().compress(msgpack.packb(obj, use_bin_type=True)))
    return path


# -- repodata --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "filename",
    ["repodata.json", "repodata.json.zst", "repodata.json.bz2", "repodata.json.gz", "current_repodata.json"],
)
async def test_learn_repodata_every_encoding(db: Path, tmp_path: Path, filename: str) -> None:
    path = write(tmp_path / filename, json.dumps(REPODATA).encode())
    n = await asyncio.to_thread(learning.learn, db, "conda-forge", "linux-64", filename, path)
    assert n == 3
    assert rows(db) == expected_rows()


async def test_learned_digests_answer_catalog_expected(db: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "repodata.json", json.dumps(REPODATA).encode())
    learning.learn(db, "conda-forge", "linux-64", "repodata.json", path)
    catalog = await Catalog.open(db)
    try:
        assert await catalog.expected("conda-forge", "linux-64", "a-1.0-h0_0.tar.bz2") == (SHA_A, 1234)
        assert await catalog.expected("conda-forge", "linux-64", "b-2.0-py311_0.conda") == (SHA_B, None)
        assert await catalog.expected("conda-forge", "linux-64", "nosha-1.0-0.tar.bz2") is None
        assert await catalog.expected("conda-forge", "noarch", "a-1.0-h0_0.tar.bz2") is None
        assert await catalog.expected("other", "linux-64", "a-1.0-h0_0.tar.bz2") is None
    finally:
        await catalog.close()


def test_learn_keys_rows_by_channel_and_subdir(db: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "repodata.json", json.dumps(REPODATA).encode())
    learning.learn(db, "conda-forge", "linux-64", "repodata.json", path)
    learning.learn(db, "pkgs/main", "noarch", "repodata.json", path)
    assert rows(db) == expected_rows() | expected_rows("pkgs/main", "noarch")


def test_relearning_replaces_rows(db: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "repodata.json", json.dumps(REPODATA).encode())
    learning.learn(db, "c", "noarch", "repodata.json", path)
    changed = {"packages": {"a-1.0-h0_0.tar.bz2": {"sha256": SHA_C, "size": 7}}}
    path2 = write(tmp_path / "repodata.json.zst", json.dumps(changed).encode())
    assert learning.learn(db, "c", "noarch", "repodata.json.zst", path2) == 1
    got = {r[2]: (r[3], r[4]) for r in rows(db)}
    assert got["a-1.0-h0_0.tar.bz2"] == (SHA_C, 7)
    assert got["b-2.0-py311_0.conda"] == (SHA_B, None)


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"packages": {}, "packages.conda": {}},
        {"info": {"subdir": "noarch"}, "removed": []},
        {"info": {"packages": {"x-1-0.conda": {"sha256": SHA_A}}}},  # not a top-level record
        {"packages": {"x-1-0.conda": {"md5": "0" * 32}}},
    ],
)
def test_learn_nothing(db: Path, tmp_path: Path, doc: dict[str, Any]) -> None:
    path = write(tmp_path / "repodata.json", json.dumps(doc).encode())
    assert learning.learn(db, "c", "noarch", "repodata.json", path) == 0
    assert rows(db) == set()


def test_packages_conda_before_packages(tmp_path: Path) -> None:
    doc = {
        "packages.conda": {"b-1-0.conda": {"sha256": SHA_B, "size": 2}},
        "packages": {"a-1-0.tar.bz2": {"depends": ["x"], "size": 1, "sha256": SHA_A}},
    }
    path = write(tmp_path / "repodata.json", json.dumps(doc).encode())
    with decoding.open_decoded(path, "repodata.json") as f:
        assert list(digests.iter_repodata_digests(f)) == [
            ("b-1-0.conda", SHA_B, 2),
            ("a-1-0.tar.bz2", SHA_A, 1),
        ]


def test_learn_many_records_in_batches(db: Path, tmp_path: Path) -> None:
    n = learning.BATCH + 17  # one full batch and a remainder
    doc = {"packages.conda": {f"p{i}-1-0.conda": {"sha256": sha(i), "size": i} for i in range(n)}}
    path = write(tmp_path / "repodata.json.zst", json.dumps(doc).encode())
    assert learning.learn(db, "c", "noarch", "repodata.json.zst", path) == n
    got = rows(db)
    assert len(got) == n
    assert ("c", "noarch", "p10016-1-0.conda", sha(10016), 10016) in got


@pytest.mark.parametrize(
    ("filename", "data"),
    [
        ("repodata.json", b'{"packages": {"a-1-0.conda": '),
        ("repodata.json", b"not json at all"),
        ("repodata.json.zst", b"\x28\xb5\x2f\xfdgarbage"),
        ("repodata.json.bz2", b"BZh9garbage"),
        ("repodata.json.gz", b"\x1f\x8bgarbage"),
    ],
)
def test_learn_corrupt_repodata_raises(db: Path, tmp_path: Path, filename: str, data: bytes) -> None:
    path = tmp_path / filename
    path.write_bytes(data)  # raw bytes: the compression itself may be broken
    with pytest.raises(Exception):  # noqa: B017 - ijson, zstd, bz2 and gzip each raise their own
        learning.learn(db, "c", "noarch", filename, path)
    assert rows(db) == set()


# -- shards ----------------------------------------------------------------------------------

SHARD = {
    "packages": {
        "numpy-1.26.0-py311h0_0.tar.bz2": {
            "name": "numpy",
            "sha256": bytes.fromhex(SHA_A),
            "md5": bytes(16),
            "size": 100,
            "depends": ["python"],
        }
    },
    "packages.conda": {
        "numpy-1.26.4-py311h1_0.conda": {
            "name": "numpy",
            "sha256": bytes.fromhex(SHA_B),
            "size": 200,
            "extra": {"sha256": bytes.fromhex(NESTED)},
        },
        "numpy-2.0.0-py312h2_0.conda": {"name": "numpy", "sha256": SHA_C.upper()},
        "numpy-0.1-0.conda": {"name": "numpy", "md5": bytes(16)},
    },
    "removed": [],
}


async def test_learn_shard(db: Path, tmp_path: Path) -> None:
    path = write_shard(tmp_path / "shard.msgpack.zst", SHARD)
    filename = f"shards/{SHA_A}.msgpack.zst"
    n = await asyncio.to_thread(learning.learn, db, "conda-forge", "linux-64", filename, path)
    assert n == 3
    assert rows(db) == {
        ("conda-forge", "linux-64", "numpy-1.26.0-py311h0_0.tar.bz2", SHA_A, 100),
        ("conda-forge", "linux-64", "numpy-1.26.4-py311h1_0.conda", SHA_B, 200),
        ("conda-forge", "linux-64", "numpy-2.0.0-py312h2_0.conda", SHA_C, None),
    }


def test_shard_with_only_one_record_key(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "s.msgpack.zst", {"packages.conda": {"x-1-0.conda": {"sha256": bytes(32)}}})
    assert list(digests.iter_shard_digests(path)) == [("x-1-0.conda", "0" * 64, None)]
    empty = write_shard(tmp_path / "e.msgpack.zst", {"packages": None, "removed": []})
    assert list(digests.iter_shard_digests(empty)) == []


def test_corrupt_shard_raises(tmp_path: Path) -> None:
    path = tmp_path / "bad.msgpack.zst"
    path.write_bytes(b"not zstd")
    with pytest.raises(zstandard.ZstdError):
        list(digests.iter_shard_digests(path))


def test_read_shard_index(tmp_path: Path) -> None:
    index = {
        "info": {
            "base_url": "https://conda.anaconda.org/conda-forge/linux-64/",
            "shards_base_url": "https://shards.example/linux-64/shards/",
            "subdir": "linux-64",
        },
        "shards": {"numpy": bytes.fromhex(SHA_A), "python": bytes.fromhex(SHA_B), "legacy": SHA_C},
    }
    path = write_shard(tmp_path / "repodata_shards.msgpack.zst", index)
    base, shards = read_shard_index(path)
    assert base == "https://shards.example/linux-64/shards/"
    assert shards == {"numpy": SHA_A, "python": SHA_B, "legacy": SHA_C}


def test_read_shard_index_defaults(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "i.msgpack.zst", {"info": {"subdir": "noarch"}, "shards": {}})
    assert read_shard_index(path) == ("./shards/", {})
    bare = write_shard(tmp_path / "j.msgpack.zst", {})
    assert read_shard_index(bare) == ("./shards/", {})


def _map_bomb(path: Path, mib: int) -> Path:
    """A zstd frame of a map whose one value is mib MiB of zeros (arrays of fixint 0)."""
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=1).stream_writer(f) as w:
        w.write(b"\x81\xa4junk\xdc" + mib.to_bytes(2, "big"))
        for _ in range(mib):
            w.write(b"\xdd" + (1 << 20).to_bytes(4, "big") + bytes(1 << 20))
    return path


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    # The caps are parameters; lowered here so the test's own memory stays small.
    bomb = _map_bomb(tmp_path / "bomb.msgpack.zst", 4)
    assert bomb.stat().st_size < 64 * 1024
    with pytest.raises(RefusedDocument, match="inflates past") as refused:
        list(shards.iter_shard_digests(bomb, limit=1 << 20))
    assert refused.value.reason == "inflated"
    with pytest.raises(RefusedDocument, match="inflates past"):
        read_shard_index(bomb, limit=1 << 20)
    # A small, valid shard under the same cap still parses.
    ok = write_shard(tmp_path / "ok.msgpack.zst", {"packages": {"x-1-0.conda": {"sha256": bytes(32)}}})
    assert list(shards.iter_shard_digests(ok, limit=1 << 20)) == [("x-1-0.conda", "0" * 64, None)]


_BOMB_CHILD = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from condaproxy.conda import digests

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmSize")

    # 256 MiB of address space beyond what the interpreter already uses.
    limit = vm_bytes() + (256 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    ok = list(digests.iter_shard_digests(Path(sys.argv[2])))
    assert ok == [("x-1-0.conda", "0" * 64, None)], ok
    try:
        list(digests.iter_shard_digests(Path(sys.argv[1])))
    except ValueError as exc:
        print("REFUSED", getattr(exc, "reason", None), exc)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and RLIMIT_AS")
def test_real_decompression_bomb_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    # In a child process with its address space capped, so a failure cannot hurt the test run.
    bomb = _map_bomb(tmp_path / "bomb.msgpack.zst", 600)
    ok = write_shard(tmp_path / "ok.msgpack.zst", {"packages": {"x-1-0.conda": {"sha256": bytes(32)}}})
    proc = subprocess.run(
        [sys.executable, "-c", _BOMB_CHILD, str(bomb), str(ok)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED inflated" in proc.stdout


# -- package_name ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "name"),
    [
        ("numpy-1.26.4-py311h64a7726_0.conda", "numpy"),
        ("numpy-1.26.4-py311h64a7726_0.tar.bz2", "numpy"),
        ("python-dateutil-2.9.0-pyhd8ed1ab_0.conda", "python-dateutil"),
        ("_openmp_mutex-4.5-2_gnu.tar.bz2", "_openmp_mutex"),
        ("tzdata-1!2024a-h0c530f3_0.conda", "tzdata"),
        ("libfoo-1.0+cuda12-hABC_1.conda", "libfoo"),
        ("r-base-4.3.1-h1_0.tar.bz2", "r-base"),
        ("a-b-c-d-1-0.conda", "a-b-c-d"),
    ],
)
def test_package_name(filename: str, name: str) -> None:
    assert paths.package_name(filename) == name
