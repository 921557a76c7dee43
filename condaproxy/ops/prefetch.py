"""`condaproxy prefetch FILE...`: warm the cache through the running proxy from lock files.

Each package URL of a pixi.lock, conda-lock.yml or @EXPLICIT file (or of an environment.yml,
solved against the proxy with py-rattler: the `solve` extra) is mapped onto the proxy's channels
and fetched through it, a few at a time, its sha256 checked against the lock file where that has
one. A progress bar on a terminal (tqdm), one line per file otherwise; then a summary.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp
from tqdm import tqdm

from condaproxy.conda.lockfiles import EnvironmentSpec, Locked, Lockfile, LockfileError, parse
from condaproxy.config.channelmap import Mapped, map_url
from condaproxy.config.model import Config
from condaproxy.http.pages import size
from condaproxy.ops.client import CommandError, admin_post, admin_token

CHUNK = 1 << 20


@dataclass
class Outcome:
    """What happened to one package."""

    locked: Locked
    source: str  # the lock file it came from
    cached: bool = False  # the proxy already had it
    nbytes: int = 0
    error: str | None = None


@dataclass
class Report:
    """The whole run."""

    outcomes: list[Outcome] = field(default_factory=list)
    skipped: int = 0  # entries that are not conda package URLs (pypi, source, paths)

    @property
    def failed(self) -> list[Outcome]:
        """Packages that could not be fetched or did not match."""
        return [o for o in self.outcomes if o.error is not None]

    def summary(self) -> list[str]:
        """The closing lines."""
        ok = [o for o in self.outcomes if o.error is None]
        fetched = sum(1 for o in ok if not o.cached)
        cached = len(ok) - fetched
        total = len(self.outcomes)
        coverage = 100.0 * len(ok) / total if total else 100.0
        lines = [
            f"{total} packages: {fetched} fetched, {cached} already cached, {len(self.failed)} failed; "
            f"{size(sum(o.nbytes for o in ok))} transferred; coverage {coverage:.1f}% of the lock file"
            + (f"s ({self.skipped} non-conda entries skipped)" if self.skipped else "s")
        ]
        lines += [f"  failed {o.locked.filename}: {o.error}" for o in self.failed]
        return lines


async def _load(path: Path, config: Config, proxy: str, platforms: list[str]) -> tuple[list[Locked], int]:
    loop = asyncio.get_running_loop()
    try:
        text = await loop.run_in_executor(None, path.read_text, "utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        parsed = parse(text)
    except LockfileError as exc:
        raise CommandError(f"{path}: {exc}") from None
    if isinstance(parsed, Lockfile):
        return list(parsed.packages), parsed.skipped
    return await _solved(path, parsed, config, proxy, platforms), 0


async def _solved(
    path: Path, spec: EnvironmentSpec, config: Config, proxy: str, platforms: list[str]
) -> list[Locked]:
    try:
        from condaproxy.ops.solve import solve
    except ImportError:
        raise CommandError(
            f"{path}: solving an environment.yml needs py-rattler: pip install 'condaproxy[solve]'"
        ) from None
    try:
        return await solve(spec, config, proxy, platforms)
    except ValueError as exc:
        raise CommandError(f"{path}: {exc}") from None


async def _fetch(session: aiohttp.ClientSession, proxy: str, config: Config, outcome: Outcome) -> None:
    mapped = map_url(config, outcome.locked.url, extra_bases=(proxy,))
    if not isinstance(mapped, Mapped):
        outcome.error = mapped
        return
    digest = hashlib.sha256()
    try:
        async with session.get(proxy + mapped.path) as resp:
            if resp.status != 200:
                text = (await resp.text(errors="replace")).strip().splitlines()
                outcome.error = f"{resp.status} {text[0][:200] if text else resp.reason}"
                return
            outcome.cached = resp.headers.get("X-Cache") == "HIT"
            async for chunk in resp.content.iter_chunked(CHUNK):
                digest.update(chunk)
                outcome.nbytes += len(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        outcome.error = f"transfer failed: {type(exc).__name__}"
        return
    want = outcome.locked.sha256
    if want is not None and digest.hexdigest() != want:
        outcome.error = f"sha256 {digest.hexdigest()[:12]}... differs from the lock file's {want[:12]}..."


async def prefetch(
    config: Config,
    proxy: str,
    files: list[Path],
    *,
    jobs: int = 4,
    pin: bool = False,
    token_file: str | None = None,
    platforms: list[str] | None = None,
    out: IO[str] = sys.stdout,
) -> int:
    """Fetch every package the files name through the proxy; 1 if anything failed."""
    token = admin_token(config, token_file) if pin else None  # fail before any download
    report = Report()
    seen: set[str] = set()
    for path in files:
        packages, skipped = await _load(path, config, proxy, platforms or [])
        report.skipped += skipped
        for locked in packages:
            if locked.url not in seen:
                seen.add(locked.url)
                report.outcomes.append(Outcome(locked, str(path)))
    tty = out.isatty()
    bar = tqdm(total=len(report.outcomes), unit="pkg", file=out, disable=not tty, dynamic_ncols=True)
    limit = asyncio.Semaphore(max(1, jobs))
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)

    async def one(session: aiohttp.ClientSession, outcome: Outcome) -> None:
        async with limit:
            await _fetch(session, proxy, config, outcome)
        if tty:
            bar.update(1)
            bar.set_postfix_str(outcome.locked.filename[:40], refresh=False)
        elif outcome.error:
            print(f"failed {outcome.locked.filename}: {outcome.error}", file=out, flush=True)
        else:
            verb = "cached " if outcome.cached else "fetched"
            print(f"{verb} {outcome.locked.filename} ({size(outcome.nbytes)})", file=out, flush=True)

    try:
        # auto_decompress off: the bytes hashed are the package's own.
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            await asyncio.gather(*(one(session, o) for o in report.outcomes))
    finally:
        bar.close()
    for line in report.summary():
        print(line, file=out)
    if pin and token is not None:
        names = sorted({o.locked.filename for o in report.outcomes if o.error is None})
        if names:
            answer = await admin_post(proxy, token, "pin", {"packages": names})
            print(f"pinned {answer.get('pinned', 0)} new packages ({len(names)} named)", file=out)
    return 1 if report.failed else 0
