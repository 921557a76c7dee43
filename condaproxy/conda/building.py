"""CEP-16 shards built from a repodata document, for channels whose upstream has none (pure).

The document is read as a stream of JSON events (ijson), one record at a time. Each record is
spilled to a scratch file as msgpack, with its offset kept per package name; the shards are
then written one package at a time from the spill. Memory holds the offsets and the records
of one package, never the document (conda-forge's linux-64: ~300 MB, ~500,000 records).

The format is the one rattler writes and conda and rattler read: a shard is a msgpack map
with `packages`, `packages.conda` and `removed`, records keyed by file name, `sha256`/`md5`
as raw bytes; the index maps each package name to the raw sha256 of its zstd-compressed
shard. CEP-48 `v3` record groups go into the shard too (as `v3: {group: {file: record}}`),
and top-level keys this module does not know are carried into the index: never dropped.
The same records give the same bytes, so an unchanged package keeps its shard across
revisions of the document.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgpack
import zstandard

from condaproxy.conda.filtering import build_value, is_record_group, json_events
from condaproxy.conda.paths import package_parts
from condaproxy.conda.shards import RECORD_KEYS

LOCAL_BASE = "./shards/"
LEVEL = 10  # zstd level of shards and index (rattler's choice is of the same order)
_DIGESTS = ("sha256", "md5")
_KNOWN = {"info", "packages", "packages.conda", "removed", "v3", "repodata_version"}


@dataclass(frozen=True, slots=True)
class Built:
    """One shard written: its package name, sha256 (hex), size and file."""

    name: str
    sha256: str
    size: int
    path: Path


def record_for_shard(record: dict[str, Any]) -> dict[str, Any]:
    """A repodata record as a shard holds it: hex digests as raw bytes (as rattler writes them)."""
    out = dict(record)
    for field in _DIGESTS:
        value = out.get(field)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):  # not hex: kept as it is rather than lost
                out[field] = bytes.fromhex(value)
    return out


def package_name(filename: str, record: dict[str, Any]) -> str:
    """The package a record belongs to: its `name`, else the one its file name spells."""
    name = record.get("name")
    return name if isinstance(name, str) and name else package_parts(filename)[0]


class _Spill:
    """Records spilled to a scratch file; offsets kept per package name."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "w+b")  # noqa: SIM115 - closed by close()
        self.offsets: dict[str, array[int]] = {}

    def add(self, name: str, item: tuple[str, str, Any]) -> None:
        data = msgpack.packb(item, use_bin_type=True)
        offset = self._file.tell()
        self._file.write(data)
        self.offsets.setdefault(name, array("q")).extend((offset, len(data)))

    def items(self, name: str) -> Iterator[tuple[str, str, Any]]:
        spots = self.offsets[name]
        for i in range(0, len(spots), 2):
            self._file.seek(spots[i])
            group, filename, value = msgpack.unpackb(self._file.read(spots[i + 1]), raw=False)
            yield group, filename, value

    def close(self) -> None:
        self._file.close()


def _shard(items: Iterator[tuple[str, str, Any]]) -> dict[str, Any]:
    shard: dict[str, Any] = {"packages": {}, "packages.conda": {}, "removed": []}
    v3: dict[str, dict[str, Any]] = {}
    for group, filename, value in items:
        if group == "removed":
            shard["removed"].append(filename)
        elif group in RECORD_KEYS:
            shard[group][filename] = value
        else:
            v3.setdefault(group, {})[filename] = value
    # Sorted: the same records always give the same bytes, whatever order the document had.
    for group in RECORD_KEYS:
        shard[group] = dict(sorted(shard[group].items()))
    shard["removed"] = sorted(shard["removed"])
    if v3:
        shard["v3"] = {g: dict(sorted(v.items())) for g, v in sorted(v3.items())}
    return shard


def _pack(document: Any) -> bytes:
    return zstandard.ZstdCompressor(level=LEVEL).compress(msgpack.packb(document, use_bin_type=True))


def build_shards(reader: IO[bytes], out_dir: Path, subdir: str) -> tuple[bytes, list[Built]]:
    """Shards (files in out_dir named <sha256>.msgpack.zst) and the index for a repodata stream.

    Returns the index's bytes (zstd msgpack) and the shards written.
    """
    spill = _Spill(out_dir / "records.spill")
    info: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    try:
        events = json_events(reader)
        for prefix, event, value in events:
            if event == "map_key" and is_record_group(prefix):
                record = build_value(events)
                if isinstance(record, dict):
                    group = prefix.removeprefix("v3.") if prefix.startswith("v3.") else prefix
                    spill.add(package_name(value, record), (group, value, record_for_shard(record)))
            elif event == "map_key" and prefix == "" and value not in RECORD_KEYS and value != "v3":
                built = build_value(events)
                if value == "info" and isinstance(built, dict):
                    info = built
                elif value == "removed" and isinstance(built, list):
                    for filename in built:
                        if isinstance(filename, str):
                            spill.add(package_parts(filename)[0], ("removed", filename, None))
                elif value not in _KNOWN:
                    extra[value] = built  # unknown top-level keys travel with the index
        shards: dict[str, bytes] = {}
        written: list[Built] = []
        for name in sorted(spill.offsets):
            data = _pack(_shard(spill.items(name)))
            digest = hashlib.sha256(data).digest()
            path = out_dir / f"{digest.hex()}.msgpack.zst"
            path.write_bytes(data)
            shards[name] = digest
            written.append(Built(name, digest.hex(), len(data), path))
    finally:
        spill.close()
        os.unlink(out_dir / "records.spill")
    index_info = {
        "subdir": info.get("subdir", subdir),
        "base_url": info.get("base_url", ""),
        "shards_base_url": LOCAL_BASE,
    }
    index_info.update({k: v for k, v in info.items() if k not in index_info})
    index = {"version": 1, "info": index_info, "shards": shards, **extra}
    return _pack(index), written
