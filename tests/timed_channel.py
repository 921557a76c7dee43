"""A small channel whose records carry chosen publication times, rewritten as upstreams do.

Packages are real (py-rattler-build), indexed with py-rattler; then every index form
(repodata.json, .zst, the CEP-16 shard index and shards) is written again from the records with
the times a test chooses, so "published last month" and "published an hour ago" sit side by side.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import rattler.index
import rattler_build
import zstandard
from channel import _run


@dataclass(frozen=True)
class Pkg:
    """One package to publish: name, version, when (Unix seconds), its dependencies."""

    name: str
    version: str
    published: float | None
    depends: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}-0.conda"


def publish(root: Path, packages: list[Pkg], *, indexed: bool = False) -> dict[str, Any]:
    """Build what is missing, index, and write every index form with the packages' times.

    indexed: the channel states CEP-47 indexed_timestamp (set to the publication time).
    """
    subdir = root / "noarch"
    subdir.mkdir(parents=True, exist_ok=True)
    for pkg in packages:
        if (subdir / pkg.filename).exists():
            continue
        files = root.parent / f"{root.name}-files" / pkg.filename
        (files / "share").mkdir(parents=True, exist_ok=True)
        (files / "share" / f"{pkg.name}.txt").write_text(f"{pkg.name} {pkg.version}\n")
        rattler_build.assemble_package(
            pkg.name,
            pkg.version,
            "noarch",
            "0",
            subdir,
            files_dir=files,
            noarch="generic",
            depends=list(pkg.depends),
            detect_prefix=False,
            compression_level=1,
        )
    for stale in [
        subdir / "repodata.json",
        subdir / "repodata.json.zst",
        subdir / "repodata_shards.msgpack.zst",
    ]:
        stale.unlink(missing_ok=True)
    _run(rattler.index.index_fs(root, force=True))
    repodata = json.loads((subdir / "repodata.json").read_text())
    wanted = {p.filename: p for p in packages}
    records = repodata["packages.conda"]
    for filename in list(records):
        pkg = wanted.get(filename)
        if pkg is None:
            del records[filename]
            continue
        record = records[filename]
        record.pop("indexed_timestamp", None)
        record.pop("timestamp", None)
        record["depends"] = list(pkg.depends)  # a repodata patch changes these in place
        if pkg.published is not None:
            record["timestamp"] = int(pkg.published * 1000)
            if indexed:
                record["indexed_timestamp"] = int(pkg.published * 1000)
    write_index(subdir, repodata)
    return repodata


def write_index(subdir: Path, repodata: dict[str, Any]) -> None:
    """repodata.json, .json.zst, the shard index and its shards, all from repodata."""
    data = json.dumps(repodata, indent=1).encode()
    (subdir / "repodata.json").write_bytes(data)
    (subdir / "repodata.json.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    shard_dir = subdir / "shards"
    shard_dir.mkdir(exist_ok=True)
    by_name: dict[str, dict[str, Any]] = {}
    for filename, record in repodata["packages.conda"].items():
        raw = dict(record)
        for key in ("sha256", "md5"):
            if key in raw:
                raw[key] = bytes.fromhex(raw[key])
        by_name.setdefault(record["name"], {"packages": {}, "packages.conda": {}, "removed": []})
        by_name[record["name"]]["packages.conda"][filename] = raw
    shards = {}
    for name, shard in by_name.items():
        blob = zstandard.ZstdCompressor().compress(msgpack.packb(shard, use_bin_type=True))
        digest = hashlib.sha256(blob).digest()
        (shard_dir / f"{digest.hex()}.msgpack.zst").write_bytes(blob)
        shards[name] = digest
    index = {
        "info": {"subdir": subdir.name, "base_url": "", "shards_base_url": "./shards/"},
        "shards": shards,
    }
    blob = zstandard.ZstdCompressor().compress(msgpack.packb(index, use_bin_type=True))
    (subdir / "repodata_shards.msgpack.zst").write_bytes(blob)


class Clock:
    """A clock tests move by hand (no sleeping)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
