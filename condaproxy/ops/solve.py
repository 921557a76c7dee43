"""Solving an environment.yml against the proxy with py-rattler (the `solve` extra), so that a
prefetch warms exactly what an install through the proxy would fetch: repodata (read through the
proxy while solving) and the packages of the solution."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, cast

import rattler

from condaproxy.conda.lockfiles import EnvironmentSpec, Locked
from condaproxy.config.channelmap import channel_url
from condaproxy.config.model import Config


async def solve(spec: EnvironmentSpec, config: Config, proxy: str, platforms: list[str]) -> list[Locked]:
    """The packages of spec's solution for each platform (default: this machine's)."""
    sources = [channel_url(config, c, proxy) for c in spec.channels or ("conda-forge",)]
    current = str(rattler.Platform.current())
    wanted = platforms or list(spec.platforms) or [current]
    found: dict[str, Locked] = {}
    # A private repodata cache: what is solved is read through the proxy, and so warms it.
    with tempfile.TemporaryDirectory(prefix="condaproxy-solve-") as cache:
        gateway = rattler.Gateway(cache_dir=Path(cache))
        for platform in wanted:
            # Virtual packages are this machine's only when solving for this machine.
            virtual = rattler.VirtualPackage.detect() if platform == current else []
            try:
                records = await rattler.solve(
                    sources=sources,
                    specs=list(spec.specs),
                    gateway=gateway,
                    platforms=cast(Any, [platform, "noarch"]),  # validated by rattler
                    virtual_packages=virtual,
                )
            except Exception as exc:  # rattler's errors have no common base class
                raise ValueError(f"cannot solve for {platform}: {str(exc).splitlines()[0]}") from None
            for record in records:
                sha = record.sha256.hex() if isinstance(record.sha256, bytes) else record.sha256
                md5 = record.md5.hex() if isinstance(record.md5, bytes) else record.md5
                found.setdefault(str(record.url), Locked(str(record.url), sha, md5))
    return list(found.values())
