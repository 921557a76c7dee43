"""Build a small, real conda channel for tests.

The channel is made with rattler-build's ``assemble_package`` and indexed with
rattler's ``index_fs``, so it has exactly the files a real channel has:
``repodata.json``, ``repodata.json.zst``, ``repodata_shards.msgpack.zst`` and
``shards/<sha256>.msgpack.zst`` (CEP-16) in every subdir.

Contents (``noarch`` packages are ``noarch: generic``)::

    noarch/cp-base-1.0        (no deps)
    noarch/cp-lib-1.0         cp-base
    noarch/cp-lib-1.1         cp-base, cp-data
    noarch/cp-app-1.0         cp-lib >=1, cp-tools
    noarch/cp-extra-0.1       cp-app, cp-big
    linux-64/cp-data-1.0      2 MiB of incompressible bytes
    linux-64/cp-tools-1.0     3 MiB of incompressible bytes
    linux-64/cp-big-1.0       6 MiB of incompressible bytes

so solving ``cp-app`` for linux-64 pulls packages from both subdirs
(cp-app, cp-lib 1.1, cp-base, cp-data, cp-tools), and ``cp-extra`` pulls all
three large ones.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import random
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rattler.index
import rattler_build

# Fixed build timestamp so package archives are reproducible across runs.
BUILD_TIMESTAMP = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
MiB = 1024 * 1024
SUBDIRS = ("noarch", "linux-64")
REPODATA_FILES = ("repodata.json", "repodata.json.zst", "repodata_shards.msgpack.zst")


@dataclass(frozen=True)
class _Spec:
    name: str
    version: str
    subdir: str
    depends: tuple[str, ...] = ()
    payload_size: int = 0  # random bytes in lib/<name>/blob.bin (arch packages)


SPECS: tuple[_Spec, ...] = (
    _Spec("cp-base", "1.0", "noarch"),
    _Spec("cp-lib", "1.0", "noarch", ("cp-base",)),
    _Spec("cp-lib", "1.1", "noarch", ("cp-base", "cp-data")),
    _Spec("cp-app", "1.0", "noarch", ("cp-lib >=1", "cp-tools")),
    _Spec("cp-extra", "0.1", "noarch", ("cp-app", "cp-big")),
    _Spec("cp-data", "1.0", "linux-64", payload_size=2 * MiB),
    _Spec("cp-tools", "1.0", "linux-64", payload_size=3 * MiB),
    _Spec("cp-big", "1.0", "linux-64", payload_size=6 * MiB),
)


@dataclass(frozen=True)
class PackageInfo:
    """One package archive of the channel, as its repodata describes it."""

    subdir: str
    filename: str
    name: str
    version: str
    sha256: str
    size: int
    path: Path

    @property
    def url_path(self) -> str:
        """The path relative to the channel root, e.g. ``noarch/cp-app-1.0-0.conda``."""
        return f"{self.subdir}/{self.filename}"

    def read_bytes(self) -> bytes:
        """The archive's bytes."""
        return self.path.read_bytes()


@dataclass(frozen=True)
class Channel:
    """A built channel: its root directory and its packages keyed ``<subdir>/<filename>``."""

    path: Path
    packages: dict[str, PackageInfo] = field(hash=False)

    @property
    def subdirs(self) -> tuple[str, ...]:
        """The channel's subdirs."""
        return SUBDIRS

    def by_name(self, name: str, version: str | None = None) -> PackageInfo:
        """The (single, or highest-listed matching ``version``) package called ``name``."""
        found = [
            p
            for p in self.packages.values()
            if p.name == name and (version is None or p.version == version)
        ]
        if not found:
            raise KeyError(f"no package {name!r} {version or ''} in channel")
        return max(found, key=lambda p: tuple(int(x) for x in p.version.split(".")))

    def shardless_copy(self, dest: Path) -> Path:
        """Copy the channel to ``dest`` without ``repodata_shards.msgpack.zst`` and ``shards/``."""
        return _copy_tree(
            self.path,
            dest,
            skip=lambda rel: rel.name == "repodata_shards.msgpack.zst" or "shards" in rel.parts[1:2],
        )

    def json_only_copy(self, dest: Path) -> Path:
        """Copy the channel to ``dest`` with only ``repodata.json`` (no ``.zst``, no shards)."""
        return _copy_tree(
            self.path,
            dest,
            skip=lambda rel: rel.suffix == ".zst" or "shards" in rel.parts[1:2],
        )


def build_channel(root: Path) -> Channel:
    """Build, index and describe the test channel under ``root`` (created if needed)."""
    root.mkdir(parents=True, exist_ok=True)
    for subdir in SUBDIRS:
        (root / subdir).mkdir(exist_ok=True)
    rng = random.Random(20240101)  # seeded: same payloads every run
    with tempfile.TemporaryDirectory(prefix="cp-staging-") as staging_dir:
        staging = Path(staging_dir)
        for spec in SPECS:
            files = staging / f"{spec.name}-{spec.version}"
            _stage_files(files, spec, rng)
            rattler_build.assemble_package(
                spec.name,
                spec.version,
                spec.subdir,
                "0" if spec.subdir == "noarch" else "h0000000_0",
                root / spec.subdir,
                files_dir=files,
                depends=list(spec.depends),
                noarch="generic" if spec.subdir == "noarch" else None,
                summary=f"condaproxy test package {spec.name}",
                license="BSD-3-Clause",
                compression_level=1,  # payloads are random; don't waste time compressing
                timestamp=BUILD_TIMESTAMP,
                detect_prefix=False,
            )
    _run(rattler.index.index_fs(root))
    return Channel(path=root, packages=_describe(root))


def _stage_files(files: Path, spec: _Spec, rng: random.Random) -> None:
    """Write the files that go into one package."""
    share = files / "share" / spec.name
    share.mkdir(parents=True)
    (share / "README").write_text(f"{spec.name} {spec.version}\n", encoding="utf-8")
    if spec.payload_size:
        lib = files / "lib" / spec.name
        lib.mkdir(parents=True)
        (lib / "blob.bin").write_bytes(rng.randbytes(spec.payload_size))


def _describe(root: Path) -> dict[str, PackageInfo]:
    """Read every subdir's repodata.json and check each record against its file."""
    packages: dict[str, PackageInfo] = {}
    for subdir in SUBDIRS:
        repodata = json.loads((root / subdir / "repodata.json").read_bytes())
        records: dict[str, dict[str, Any]] = {
            **repodata.get("packages", {}),
            **repodata.get("packages.conda", {}),
        }
        for filename, record in sorted(records.items()):
            path = root / subdir / filename
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest != record["sha256"] or len(data) != record["size"]:
                raise AssertionError(f"repodata disagrees with {path}")
            packages[f"{subdir}/{filename}"] = PackageInfo(
                subdir=subdir,
                filename=filename,
                name=record["name"],
                version=record["version"],
                sha256=record["sha256"],
                size=record["size"],
                path=path,
            )
    expected = len(SPECS)
    if len(packages) != expected:
        raise AssertionError(f"indexed {len(packages)} packages, built {expected}")
    return packages


def _copy_tree(src: Path, dest: Path, skip: Callable[[Path], bool]) -> Path:
    """Copy ``src`` to ``dest`` leaving out files whose relative path ``skip`` accepts."""
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = file.relative_to(src)
        if skip(rel):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target)
    for subdir in SUBDIRS:
        (dest / subdir).mkdir(parents=True, exist_ok=True)
    return dest


def _run(result: Awaitable[None] | None) -> None:
    """Wait for ``index_fs``, which is a coroutine in some py-rattler versions and sync in others."""
    if result is None:
        return

    async def wait() -> None:
        await result

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(wait())
        return
    # Called from inside a running loop (e.g. an async test): use a private loop in a thread.
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(wait())
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def channel_files(channel: Channel) -> Iterable[Path]:
    """Every file of the channel, relative to its root."""
    return sorted(p.relative_to(channel.path) for p in channel.path.rglob("*") if p.is_file())
