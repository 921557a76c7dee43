"""The benchmark's channels, built once and cached (by default under ~/.cache/condaproxy-bench).

`benchchan` is a real channel: packages made with py-rattler-build, indexed with py-rattler
(repodata.json, .zst, CEP-16 shards): hundreds of small packages (~15 KB, incompressible) with a
dependency DAG, and two large incompressible packages (200 MB and 1 GB in the full size).
`cfscale` is a synthetic conda-forge-sized linux-64 repodata (synth.py) with no package files.

The manifest (manifest.json) lists every file with its size and sha256: every body a client
receives is checked against it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import synth

BENCH = "benchchan"
CFSCALE = "cfscale"
VERSION = 1  # bump when the layout changes: a cached channel of another version is rebuilt
MB = 1024 * 1024
BUILD_TIMESTAMP = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
APP = "bench-app"


@dataclass(frozen=True)
class ChannelSize:
    """How big the channels are."""

    small: int  # small packages besides bench-app (the app's closure is `closure` of them)
    closure: int
    small_payload: int  # random bytes in each small package (~15 KB archive at 14,000)
    large: int  # bytes of the large package (hit-large, cold-collapse)
    huge: int  # bytes of the huge package (memory)
    records: int  # synthetic repodata records (cfscale)

    @property
    def key(self) -> str:
        return (
            f"v{VERSION}-s{self.small}-c{self.closure}-p{self.small_payload}-l{self.large}-h{self.huge}"
            f"-r{self.records}"
        )


FULL = ChannelSize(300, 50, 14_000, 200 * MB, 1024 * MB, 500_000)
QUICK = ChannelSize(30, 10, 14_000, 8 * MB, 24 * MB, 5_000)


@dataclass(frozen=True)
class File:
    """One file of the origin: its URL path below the origin root, size and sha256."""

    path: str
    size: int
    sha256: str

    @property
    def url_path(self) -> str:
        return "/" + self.path


@dataclass
class Channels:
    """The built channels, with the files each scenario uses."""

    root: Path  # the origin's document root
    size: ChannelSize
    files: dict[str, File]  # by path
    packages: list[str]  # small package paths of benchchan
    shards: list[str]  # shard paths of benchchan
    shard: str  # the small shard of hit-small
    package: str  # the ~15 KB package of hit-small
    large: str
    huge: str
    closure: list[str]  # bench-app and what it depends on: what a client installs
    cf_records: int
    cf_json: str
    cf_zst: str
    cf_index: str
    cf_shards: list[str]  # a sample of cfscale shards for the ingest

    def file(self, path: str) -> File:
        return self.files[path]

    def local(self, path: str) -> Path:
        return self.root / path

    @property
    def small_files(self) -> list[str]:
        """Warm small files for latency clients: shards and packages of benchchan."""
        return [*self.shards, *self.packages]


def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MB)
            f.write(os.urandom(n))
            left -= n


def _dag(size: ChannelSize) -> list[tuple[str, str, list[str]]]:
    """(name, version, depends) of the small packages: a DAG whose closure under bench-app is known."""
    rng = random.Random(20240101)
    specs: list[tuple[str, str, list[str]]] = []
    for i in range(size.small):
        name = f"bench-p{i:03d}"
        if i < size.closure:
            # Inside the app's closure: each depends on its predecessor and on its "parent" i//2.
            deps = sorted({f"bench-p{i - 1:03d}", f"bench-p{i // 2:03d}"} - {name}) if i else []
        else:
            lo = size.closure
            deps = sorted({f"bench-p{rng.randrange(lo, i):03d}" for _ in range(2)}) if i > lo else []
        specs.append((name, "1.0", deps))
        if i < min(10, size.closure):
            specs.append((name, "1.1", deps))  # a newer version the solver must prefer
    top = [f"bench-p{size.closure - 1:03d}", *(f"bench-p{i:03d}" for i in range(0, size.closure, 7))]
    specs.append((APP, "1.0", sorted(set(top))))
    return specs


def _assemble(
    name: str, version: str, subdir: str, out: Path, staging: Path, payload: int, depends: list[str]
) -> None:
    import rattler_build

    files = staging / f"{name}-{version}"
    share = files / "share" / name
    share.mkdir(parents=True)
    (share / "README").write_text(f"{name} {version}\n")
    if payload:
        _write_random(share / "payload.bin", payload)
    rattler_build.assemble_package(
        name,
        version,
        subdir,
        "0" if subdir == "noarch" else "h0000000_0",
        out / subdir,
        files_dir=files,
        depends=depends,
        noarch="generic" if subdir == "noarch" else None,
        summary=f"condaproxy benchmark package {name}",
        license="BSD-3-Clause",
        compression_level=1,  # payloads are random: compressing them wastes time
        timestamp=BUILD_TIMESTAMP,
        detect_prefix=False,
    )
    shutil.rmtree(files)


def _index(root: Path) -> None:
    import rattler.index

    result = rattler.index.index_fs(root)
    if result is not None:  # a coroutine in some py-rattler versions

        async def wait() -> None:
            await result

        asyncio.run(wait())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MB):
            h.update(chunk)
    return h.hexdigest()


def _build_benchchan(root: Path, size: ChannelSize, say: Callable[[str], None]) -> None:
    chan = root / BENCH
    for subdir in ("noarch", "linux-64"):
        (chan / subdir).mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="bench-staging-", dir=root.parent) as tmp:
        staging = Path(tmp)
        specs = _dag(size)
        say(f"building {len(specs)} small packages")
        for i, (name, version, deps) in enumerate(specs):
            subdir = "noarch" if i % 3 == 2 else "linux-64"
            _assemble(name, version, subdir, chan, staging, size.small_payload, deps)
        for name, nbytes in (("bench-large", size.large), ("bench-huge", size.huge)):
            say(f"building {name} ({nbytes // MB} MB)")
            _assemble(name, "1.0", "linux-64", chan, staging, nbytes, [])
    say("indexing benchchan")
    _index(chan)


def _manifest(root: Path, size: ChannelSize, cf: dict[str, Any]) -> dict[str, Any]:
    files: dict[str, File] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(f"{CFSCALE}/linux-64/shards/"):
            continue  # 25,000 of them: their names are their digests (checked when fetched)
        files[rel] = File(rel, path.stat().st_size, sha256_file(path))
    sub = f"{BENCH}/linux-64"
    packages = sorted(p for p in files if p.startswith(BENCH) and p.endswith(".conda") and "/bench-p" in p)
    shards = sorted(p for p in files if p.startswith(f"{BENCH}/") and "/shards/" in p)
    closure_names = {APP, *(f"bench-p{i:03d}" for i in range(size.closure))}
    closure = sorted(
        p for p in files if p.endswith(".conda") and p.rsplit("/", 1)[1].rsplit("-", 2)[0] in closure_names
    )
    # hit-small: the smallest shard, and a package of the app's closure
    shard = min(shards, key=lambda p: (files[p].size, p))
    package = next(p for p in packages if "/bench-p000-1.0-" in p)
    return {
        "size": asdict(size),
        "files": {k: asdict(v) for k, v in files.items()},
        "packages": packages,
        "shards": shards,
        "shard": shard,
        "package": package,
        "large": next(p for p in files if p.startswith(f"{sub}/bench-large-")),
        "huge": next(p for p in files if p.startswith(f"{sub}/bench-huge-")),
        "closure": closure,
        **cf,
    }


def load_or_build(cache: Path, size: ChannelSize, say: Callable[[str], None]) -> Channels:
    """The channels of this size from the cache directory, built there first if missing."""
    home = cache / size.key
    manifest = home / "manifest.json"
    if not manifest.exists():
        if home.exists():
            shutil.rmtree(home)  # a build that was interrupted
        cache.mkdir(parents=True, exist_ok=True)
        building = cache / f".{size.key}.building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        t0 = time.monotonic()
        try:
            root = building / "origin"
            root.mkdir(parents=True)
            _build_benchchan(root, size, say)
            say(f"writing the synthetic repodata ({size.records:,} records)")
            cf = synth.write_channel(root / CFSCALE, size.records)
            say("hashing every file for the manifest")
            data = _manifest(root, size, cf)
            (building / "manifest.json").write_text(json.dumps(data, indent=1))
            building.rename(home)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        say(f"channels built in {time.monotonic() - t0:.0f} s, cached in {home}")
    data = json.loads(manifest.read_text())
    files = {k: File(**v) for k, v in data["files"].items()}
    return Channels(
        root=home / "origin",
        size=ChannelSize(**data["size"]),
        files=files,
        packages=data["packages"],
        shards=data["shards"],
        shard=data["shard"],
        package=data["package"],
        large=data["large"],
        huge=data["huge"],
        closure=data["closure"],
        cf_records=data["cf_records"],
        cf_json=data["cf_json"],
        cf_zst=data["cf_zst"],
        cf_index=data["cf_index"],
        cf_shards=data["cf_shards"],
    )
