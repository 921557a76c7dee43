"""Shard building from a repodata stream (pure): grouping, raw digests, v3 and unknown keys kept."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import msgpack
import zstandard

from condaproxy.conda.building import build_shards


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 24), raw=False)


def rec(name: str, version: str) -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "build": "0",
        "build_number": 0,
        "depends": [],
        "sha256": "ab" * 32,
        "md5": "cd" * 16,
        "size": 1,
        "subdir": "noarch",
    }


DOC = {
    "info": {"subdir": "noarch", "base_url": "https://example.org/pkgs/"},
    "repodata_version": 2,
    "packages": {"a-1.0-0.tar.bz2": rec("a", "1.0")},
    "packages.conda": {"a-2.0-0.conda": rec("a", "2.0"), "b-1.0-0.conda": rec("b", "1.0")},
    "removed": ["a-0.1-0.tar.bz2", "c-1.0-0.conda"],
    "v3": {"whl": {"b-2.0-0.whl": rec("b", "2.0")}},
    "x-future": {"kept": [1, 2]},
}


def build(tmp_path: Path, doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    data, built = build_shards(io.BytesIO(json.dumps(doc).encode()), tmp_path, "noarch")
    index = unpack(data)
    shards = {b.name: unpack(b.path.read_bytes()) for b in built}
    assert {b.name: bytes.fromhex(b.sha256) for b in built} == index["shards"]
    return index, shards


def test_grouped_by_name_with_raw_digests(tmp_path: Path) -> None:
    index, shards = build(tmp_path, DOC)
    assert set(shards) == {"a", "b", "c"}
    assert set(shards["a"]["packages"]) == {"a-1.0-0.tar.bz2"}
    assert set(shards["a"]["packages.conda"]) == {"a-2.0-0.conda"}
    assert shards["a"]["removed"] == ["a-0.1-0.tar.bz2"]
    assert shards["c"] == {"packages": {}, "packages.conda": {}, "removed": ["c-1.0-0.conda"]}
    record = shards["b"]["packages.conda"]["b-1.0-0.conda"]
    assert record["sha256"] == bytes.fromhex("ab" * 32) and record["md5"] == bytes.fromhex("cd" * 16)
    assert index["version"] == 1
    assert index["info"]["shards_base_url"] == "./shards/"
    assert index["info"]["base_url"] == "https://example.org/pkgs/"


def test_v3_groups_and_unknown_keys_carried(tmp_path: Path) -> None:
    index, shards = build(tmp_path, DOC)
    assert set(shards["b"]["v3"]["whl"]) == {"b-2.0-0.whl"}
    assert index["x-future"] == {"kept": [1, 2]}


def test_same_records_same_bytes_whatever_the_order(tmp_path: Path) -> None:
    first, _ = build(tmp_path / "1" if (tmp_path / "1").mkdir() is None else tmp_path, DOC)
    shuffled = dict(DOC, **{"packages.conda": dict(reversed(list(DOC["packages.conda"].items())))})
    (tmp_path / "2").mkdir()
    second, _ = build(tmp_path / "2", shuffled)
    assert first["shards"] == second["shards"]
    changed = json.loads(json.dumps(DOC))
    changed["packages.conda"]["b-1.0-0.conda"]["size"] = 2
    (tmp_path / "3").mkdir()
    third, _ = build(tmp_path / "3", changed)
    assert third["shards"]["a"] == first["shards"]["a"] and third["shards"]["b"] != first["shards"]["b"]
