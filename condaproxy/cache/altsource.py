"""Alternate content sources (Pulp's ACS): packages served from a local channel tree, not upstream.

A channel's `alternate_source` is a directory laid out like the channel (`<subdir>/<file>`),
say an rsync'd mirror or a NFS share. A package found there is used only when its sha256 and
size match what the channel's *own* metadata says: the tree is a hint, never an authority.
The file is copied into the download's temp file while it is hashed, so what is verified is
exactly what is served and stored, whatever happens to the tree meanwhile; then it is
published as the body and persisted like any upstream download.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from condaproxy.cache.inflight import Download, Head
from condaproxy.cache.persist import PersistQueue
from condaproxy.cache.unit import Unit
from condaproxy.conda.paths import Kind, UnitKey
from condaproxy.config.model import ChannelConfig

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
Expected = tuple[str, int | None]
ExpectedLookup = Callable[[UnitKey, ChannelConfig], Awaitable[Expected | None]]


def local_path(root: Path, key: UnitKey) -> Path | None:
    """Where key would sit in the tree at root; None for anything but a package in a subdir."""
    if key.kind is not Kind.PACKAGE or not key.subdir or "/" in key.filename:
        return None
    # The path parser already refuses "..", "/" and leading dots; this only restates it here.
    return root / key.subdir / key.filename


def _size(path: Path) -> int | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


class _TooLong(Exception):
    """The file holds more bytes than the channel says the package has."""


def _copy_and_hash(src: Path, dst: Path, limit: int | None) -> tuple[str, int] | None:
    """Copy src into a new file dst while hashing; None (dst removed) if it exceeds limit bytes."""
    hasher = hashlib.sha256()
    size = 0
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with open(src, "rb") as f:
            while chunk := f.read(READ_SIZE):
                size += len(chunk)
                if limit is not None and size > limit:
                    raise _TooLong
                hasher.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
    except _TooLong:
        dst.unlink(missing_ok=True)
        return None
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return hasher.hexdigest(), size


async def serve(
    dl: Download, channel: ChannelConfig, expected: ExpectedLookup | None, persist: PersistQueue
) -> bool:
    """Fill dl from the channel's alternate source if the file there verifies; False to go upstream."""
    root = channel.alternate_source
    src = local_path(root, dl.key) if root is not None else None
    if src is None or expected is None:
        return False
    loop = asyncio.get_running_loop()
    have = await loop.run_in_executor(None, _size, src)
    if have is None:
        return False
    try:
        want = await expected(dl.key, channel)
    except Exception as exc:  # no digest, no trust: the upstream path reports its own errors
        log.warning("%s: alternate source not used, digest lookup failed: %s", dl.key, exc)
        return False
    if want is None:
        log.info("%s: alternate source not used, the channel's metadata gives no sha256", dl.key)
        return False
    want_sha, want_size = want
    if want_size is not None and have != want_size:
        log.warning("%s: alternate source file %s has the wrong size; ignored", dl.key, src)
        return False
    try:
        got = await loop.run_in_executor(None, _copy_and_hash, src, dl.temp_path, want_size)
    except OSError as exc:
        log.warning("%s: alternate source unreadable (%s); using the upstream", dl.key, exc.strerror or exc)
        return False
    if got is None or got[0] != want_sha or (want_size is not None and got[1] != want_size):
        # The tree is stale or damaged; the temp file is gone again, so the upstream path starts clean.
        await loop.run_in_executor(None, lambda: dl.temp_path.unlink(missing_ok=True))
        log.warning(
            "%s: alternate source file %s does not match the channel's sha256/size; ignored", dl.key, src
        )
        return False
    sha, size = got
    headers = {"Content-Type": "application/octet-stream", "ETag": f'"{sha}"'}
    dl.start_body(Head(headers, size))
    dl.finish(size, sha)
    log.info("%s: served from alternate source %s", dl.key, src)
    now = time.time()
    unit = Unit(dl.key, src.as_uri(), sha, sha, size, headers, headers["ETag"], None, now, now)
    # A failure is counted and logged by the persist queue; the client already has its bytes.
    with contextlib.suppress(Exception):
        await persist.persist(unit, dl.temp_path)
    return True
