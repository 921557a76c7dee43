"""A real client in its own process: py-rattler solves bench-app and installs it through a peer.

    python -m benchmarks.rattler_client URL WORKDIR

prints one JSON line: the seconds the solve and install took and what was installed (file
names with the sha256 rattler recorded, which it checked while extracting).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import rattler


async def install(channel_url: str, work: Path) -> dict[str, object]:
    t0 = time.monotonic()
    gateway = rattler.Gateway(
        cache_dir=work / "repodata", default_config=rattler.SourceConfig(sharded_enabled=True)
    )
    records = await rattler.solve(
        sources=[channel_url],
        specs=["bench-app"],
        gateway=gateway,
        platforms=["linux-64", "noarch"],
        virtual_packages=[],
    )
    await rattler.install(records, target_prefix=work / "env", cache_dir=work / "pkgs", show_progress=False)
    seconds = time.monotonic() - t0
    installed = {}
    for meta in sorted((work / "env" / "conda-meta").glob("*.json")):
        record = json.loads(meta.read_text())
        installed[f"{record['subdir']}/{record['fn']}"] = record.get("sha256", "")
    return {"seconds": seconds, "installed": installed}


def main() -> None:
    url, work = sys.argv[1], Path(sys.argv[2])
    print(json.dumps(asyncio.run(install(url, work))), flush=True)
    # py-rattler's runtime threads can abort the interpreter's finalization ("PyGILState_Release:
    # thread state must be current"): the result is out, so leave without finalizing.
    os._exit(0)


if __name__ == "__main__":
    main()
