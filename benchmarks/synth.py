"""A synthetic conda-forge-sized linux-64 repodata: repodata.json, .json.zst and CEP-16 shards.

conda-forge's linux-64 repodata.json is ~300 MB with ~500,000 records over ~25,000 package
names. The records here look like conda-forge's (depends, constrains, md5, sha256, size,
timestamp; a third .tar.bz2, the rest .conda), with unique digests, and are written as text in
one streaming pass per section, the .zst compressed as the JSON is written: no document is ever
held in memory. Package files do not exist: only the metadata passes through the proxies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import zstandard

PER_NAME = 20
SUBDIR = "linux-64"
SHARD_SAMPLE = 200


def _record(n: int, j: int, names: int) -> tuple[str, dict[str, Any]]:
    """File name and record of version j of package n (deterministic)."""
    name = f"cf-pkg{n:05d}"
    version = f"{1 + j // 4}.{j % 4}.{n % 7}"
    build = f"py312h{(n * 31 + j) & 0xFFFFFFF:07x}_{j % 3}"
    ext = ".tar.bz2" if j % 3 == 0 else ".conda"
    seed = f"cf{n}:{j}".encode()
    record = {
        "build": build,
        "build_number": j % 3,
        "constrains": ["__glibc >=2.17", f"cf-pkg{(n * 17 + 3) % names:05d} <{j + 2}"],
        "depends": [
            "libgcc >=13",
            "libstdcxx >=13",
            "libzlib >=1.3.1,<2.0a0",
            "openssl >=3.4.0,<4.0a0",
            "python >=3.12,<3.13.0a0",
            "python_abi 3.12.* *_cp312",
            f"cf-pkg{(n * 7 + 1) % names:05d} >={j % 5}.0",
            f"cf-pkg{(n * 13 + 2) % names:05d}",
        ],
        "license": "BSD-3-Clause AND MIT",
        "license_family": "BSD",
        "md5": hashlib.md5(seed).hexdigest(),
        "name": name,
        "sha256": hashlib.sha256(seed).hexdigest(),
        "size": 10_000 + (n * 7919 + j * 104729) % 5_000_000,
        "subdir": SUBDIR,
        "timestamp": 1_600_000_000_000 + n * 1000 + j,
        "version": version,
    }
    return f"{name}-{version}-{build}{ext}", record


def _records(names: int, total: int, tarbz2: bool) -> Iterator[tuple[int, str, dict[str, Any]]]:
    for n in range(names):
        for j in range(PER_NAME):
            if n * PER_NAME + j >= total:
                return
            if (j % 3 == 0) == tarbz2:
                fn, rec = _record(n, j, names)
                yield n, fn, rec


def _write_json(path: Path, records: int, names: int) -> None:
    """repodata.json and repodata.json.zst in one pass, section by section."""
    dumps = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode
    with (
        open(path, "wb") as raw,
        open(path.with_name(path.name + ".zst"), "wb") as zraw,
        zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(zraw) as z,
    ):

        def out(text: str) -> None:
            data = text.encode()
            raw.write(data)
            z.write(data)

        out('{"info":' + dumps({"subdir": SUBDIR}) + ",")
        for key, tarbz2 in (("packages", True), ("packages.conda", False)):
            out(f'"{key}":{{')
            batch: list[str] = []
            first = True
            for _, fn, rec in _records(names, records, tarbz2):
                batch.append(("" if first else ",") + f'"{fn}":{dumps(rec)}')
                first = False
                if len(batch) >= 2000:
                    out("".join(batch))
                    batch.clear()
            out("".join(batch) + "},")
        out('"removed":[],"repodata_version":1}')


def _pack_zst(doc: dict[str, Any], level: int = 3) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(msgpack.packb(doc, use_bin_type=True))


def _write_shards(subdir: Path, records: int, names: int) -> list[str]:
    """One shard per package name, and the index naming them; returns the shard file names."""
    shards_dir = subdir / "shards"
    shards_dir.mkdir()
    index: dict[str, bytes] = {}
    written: list[str] = []
    for n in range(names):
        shard: dict[str, Any] = {"packages": {}, "packages.conda": {}, "removed": []}
        for j in range(PER_NAME):
            if n * PER_NAME + j >= records:
                break
            fn, rec = _record(n, j, names)
            rec["sha256"] = bytes.fromhex(rec["sha256"])
            rec["md5"] = bytes.fromhex(rec["md5"])
            shard["packages" if fn.endswith(".tar.bz2") else "packages.conda"][fn] = rec
        if not shard["packages"] and not shard["packages.conda"]:
            break
        data = _pack_zst(shard)
        digest = hashlib.sha256(data).digest()
        name = f"{digest.hex()}.msgpack.zst"
        (shards_dir / name).write_bytes(data)
        index[f"cf-pkg{n:05d}"] = digest
        written.append(name)
    info = {"subdir": SUBDIR, "base_url": "", "shards_base_url": "./shards/"}
    (subdir / "repodata_shards.msgpack.zst").write_bytes(
        _pack_zst({"version": 1, "info": info, "shards": index}, level=10)
    )
    return written


def write_channel(root: Path, records: int) -> dict[str, Any]:
    """Write the cfscale channel under root; returns its manifest entries."""
    names = max(1, (records + PER_NAME - 1) // PER_NAME)
    subdir = root / SUBDIR
    subdir.mkdir(parents=True)
    noarch = root / "noarch"
    noarch.mkdir()
    empty = (
        b'{"info":{"subdir":"noarch"},"packages":{},"packages.conda":{},"removed":[],"repodata_version":1}'
    )
    (noarch / "repodata.json").write_bytes(empty)
    _write_json(subdir / "repodata.json", records, names)
    shards = _write_shards(subdir, records, names)
    step = max(1, len(shards) // SHARD_SAMPLE)
    chan = root.name
    return {
        "cf_records": records,
        "cf_json": f"{chan}/{SUBDIR}/repodata.json",
        "cf_zst": f"{chan}/{SUBDIR}/repodata.json.zst",
        "cf_index": f"{chan}/{SUBDIR}/repodata_shards.msgpack.zst",
        "cf_shards": [f"{chan}/{SUBDIR}/shards/{s}" for s in shards[::step][:SHARD_SAMPLE]],
    }
