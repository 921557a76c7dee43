"""Build time and peak RSS of shards for a conda-forge-sized repodata, and a solve's download.

Usage: python benchmarks/built_shards.py [records]   (default 500,000 records, ~300 MB)
Writes a synthetic repodata.json (many versions of ~25,000 names, conda-forge-like records),
builds shards from it in a child process (its peak RSS is the build's), then compares the
bytes one solve downloads through shards (index + the shards of a dozen names) with
repodata.json.zst.
"""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import zstandard


def write_repodata(path: Path, records: int) -> None:
    rng = random.Random(7)
    names = [f"pkg{i:05d}" for i in range(max(1, records // 20))]
    with open(path, "w") as f:
        f.write('{"info": {"subdir": "linux-64"}, "packages": {}, "packages.conda": {')
        for i in range(records):
            name = names[i % len(names)]
            version = f"{i // len(names)}.{rng.randrange(10)}.{rng.randrange(10)}"
            build = f"py312h{rng.getrandbits(28):07x}_{rng.randrange(3)}"
            record = {
                "build": build,
                "build_number": rng.randrange(3),
                "depends": [f"{rng.choice(names)} >={rng.randrange(5)}" for _ in range(rng.randrange(2, 9))]
                + ["python >=3.12,<3.13.0a0", "libgcc >=13"],
                "license": "BSD-3-Clause",
                "md5": f"{rng.getrandbits(128):032x}",
                "name": name,
                "sha256": f"{rng.getrandbits(256):064x}",
                "size": rng.randrange(10_000, 50_000_000),
                "subdir": "linux-64",
                "timestamp": 1_700_000_000_000 + i,
                "version": version,
            }
            sep = "," if i else ""
            f.write(f'{sep}"{name}-{version}-{build}.conda": {json.dumps(record)}')
        f.write('}, "removed": [], "repodata_version": 1}')


def child(src: str, out: str) -> None:
    from condaproxy.conda.building import build_shards

    start = time.perf_counter()
    with open(src, "rb") as reader:
        index, built = build_shards(reader, Path(out), "linux-64")
    took = time.perf_counter() - start
    (Path(out) / "index.msgpack.zst").write_bytes(index)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": round(took, 1), "peak_rss_mb": round(peak), "shards": len(built)}))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    records = int(sys.argv[1]) if len(sys.argv) > 1 else 500_000
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "repodata.json"
        write_repodata(src, records)
        out = work / "shards"
        out.mkdir()
        result = json.loads(
            subprocess.run(
                [sys.executable, __file__, "--child", str(src), str(out)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        # conda-forge compresses harder (and its .zst is smaller by a few per cent): level 10 is quick.
        print(json.dumps(result), flush=True)
        zst = len(zstandard.ZstdCompressor(level=10, threads=-1).compress(src.read_bytes()))
        index = (out / "index.msgpack.zst").stat().st_size
        shards = msgpack.unpackb(
            zstandard.ZstdDecompressor().decompress((out / "index.msgpack.zst").read_bytes())
        )["shards"]
        wanted = sorted(shards)[:12]  # a solve touching a dozen package names
        solve = index + sum((out / f"{shards[n].hex()}.msgpack.zst").stat().st_size for n in wanted)
        print(
            json.dumps(
                {
                    "records": records,
                    "repodata_json_mb": round(src.stat().st_size / 1e6),
                    **result,
                    "repodata_json_zst_bytes": zst,
                    "solve_via_shards_bytes": solve,
                    "shard_index_bytes": index,
                }
            )
        )


if __name__ == "__main__":
    main()
