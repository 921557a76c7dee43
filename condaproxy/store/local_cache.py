"""Hot blobs of a shared (S3) store kept on this node's disk, so a warm node's hits cost no S3 request.

A size-bounded LRU of whole, verified copies under <directory>/<2 hex>/<sha256>. A copy is made
when this node persists a blob (hard link of the verified temp file) or, after a hit served from
the bucket, by a background fill that hashes what it reads. The bucket stays the authority: a
copy is only a copy, dropped when the LRU needs room or when it looks damaged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

from cachetools import LRUCache

from condaproxy.errors import StoreError
from condaproxy.store.blobstore import BlobStore, check_key
from condaproxy.store.files import unlink_all, write_all

log = logging.getLogger(__name__)

FILLS = 4  # background copies at a time
MAX_QUEUED_FILLS = 256  # beyond this, hits are not copied (the next hit asks again)


class _Copies(LRUCache[str, int]):
    """key -> size, least recently used first; what falls out is deleted from disk."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(maxsize=max_bytes, getsizeof=lambda size: size)
        self.dropped: list[str] = []

    def popitem(self) -> tuple[str, int]:
        key, size = super().popitem()
        self.dropped.append(key)
        return key, size


def _scan(root: Path) -> list[tuple[float, str, int]]:
    """(last access, key, size) of every copy on disk; half-made ones (".*.tmp") are removed."""
    found = []
    for path in root.glob("??/*"):
        if path.name.startswith("."):
            path.unlink(missing_ok=True)
            continue
        try:
            check_key(path.name)
            st = path.stat()
        except (ValueError, OSError):
            continue
        found.append((st.st_atime, path.name, st.st_size))
    return sorted(found)


def _install(src: Path, final: Path) -> None:
    """Put src's bytes at final (a hard link, else a copy) through a name beside it."""
    final.parent.mkdir(exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # another filesystem
            shutil.copyfile(src, tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class LocalCachedStore:
    """A shared store with a local, size-bounded LRU of copies in front of it."""

    shared = True

    def __init__(self, remote: BlobStore, directory: Path, max_bytes: int) -> None:
        self.remote = remote
        self.root = directory
        self.max_bytes = max_bytes
        self._copies = _Copies(max_bytes)
        self._fills: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(FILLS)

    def __repr__(self) -> str:
        used = f"{self._copies.currsize}/{self.max_bytes} bytes"
        return f"<LocalCachedStore {used} in {self.root} before {self.remote!r}>"

    async def open(self) -> LocalCachedStore:
        """Index the copies already on disk (oldest access first), dropping what no longer fits."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: self.root.mkdir(parents=True, exist_ok=True))
        for _, key, size in await loop.run_in_executor(None, _scan, self.root):
            with contextlib.suppress(ValueError):  # larger than the whole cache
                self._copies[key] = size
        await self._drop_evicted()
        return self

    @property
    def used(self) -> int:
        """Bytes of copies on this node's disk."""
        return int(self._copies.currsize)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / check_key(key)

    async def _remember(self, key: str, size: int) -> None:
        try:
            self._copies[key] = size
        except ValueError:  # larger than the whole cache: never kept
            await asyncio.get_running_loop().run_in_executor(None, self._path(key).unlink, True)
        await self._drop_evicted()

    async def _drop_evicted(self) -> None:
        dropped, self._copies.dropped = self._copies.dropped, []
        if dropped:
            paths = [self._path(k) for k in dropped if k not in self._copies]
            await asyncio.get_running_loop().run_in_executor(None, unlink_all, paths)

    # -- the BlobStore interface ---------------------------------------------------------------

    async def put(self, key: str, src: Path) -> None:
        """Store in the bucket, then keep src's bytes as this node's copy (they are hot)."""
        await self.remote.put(key, src)
        size = await asyncio.get_running_loop().run_in_executor(None, lambda: src.stat().st_size)
        if size > self.max_bytes:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, _install, src, self._path(key))
        except OSError as exc:  # a full local disk costs a copy, never a put
            log.warning("could not keep a local copy of %s: %s", key, exc.strerror or exc)
            return
        await self._remember(key, size)

    async def delete(self, key: str) -> None:
        """Drop this node's copy; the object stays in the shared bucket."""
        self._copies.pop(key, None)
        await asyncio.get_running_loop().run_in_executor(None, self._path(key).unlink, True)
        await self.remote.delete(key)

    async def size(self, key: str) -> int | None:
        """The object's size in the bucket."""
        return await self.remote.size(key)

    def local_path(self, key: str) -> Path | None:
        """This node's copy, if it has one (and it counts as used)."""
        return self._path(key) if self._copies.get(key) is not None else None

    def keep_local(self, key: str, size: int) -> None:
        """Copy the blob to this node's disk in the background, hashing it on the way."""
        if key in self._copies or key in self._fills or size > self.max_bytes:
            return
        if len(self._fills) >= MAX_QUEUED_FILLS:
            return
        task = asyncio.get_running_loop().create_task(self._fill(key, size), name=f"local copy {key[:12]}")
        self._fills[key] = task
        task.add_done_callback(lambda _: self._fills.pop(key, None))

    async def _fill(self, key: str, size: int) -> None:
        loop = asyncio.get_running_loop()
        final = self._path(key)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.fill.tmp")
        async with self._slots:
            try:
                await loop.run_in_executor(None, lambda: final.parent.mkdir(exist_ok=True))
                fd = await loop.run_in_executor(
                    None, lambda: os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                )
                digest = hashlib.sha256()
                try:
                    async for chunk in self.remote.read(key, 0, size, size=size):
                        digest.update(chunk)
                        await loop.run_in_executor(None, write_all, fd, chunk)
                finally:
                    os.close(fd)
                if digest.hexdigest() != key:
                    raise StoreError(f"bucket object {key} hashes to {digest.hexdigest()[:12]}…")
                await loop.run_in_executor(None, os.replace, tmp, final)
            except Exception as exc:  # a copy is an optimisation: the next hit tries again
                log.warning("could not copy %s to the local cache: %s", key, exc)
                await loop.run_in_executor(None, tmp.unlink, True)
                return
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        await self._remember(key, size)

    async def presign(self, key: str, ttl: int) -> str | None:
        """The bucket's presigned URL."""
        return await self.remote.presign(key, ttl)

    def read(
        self, key: str, offset: int, count: int, *, size: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Bytes from the bucket (local copies are sent with sendfile by the caller)."""
        return self.remote.read(key, offset, count, size=size)

    def keys(self) -> AsyncIterator[str]:
        """Every key in the bucket."""
        return self.remote.keys()

    async def remove_partials(self) -> list[str]:
        """Nothing left to do: open() already removed half-made copies."""
        return await self.remote.remove_partials()

    async def close(self) -> None:
        """Stop background copies, then close the bucket's client; safe to call twice."""
        fills = list(self._fills.values())
        for task in fills:
            task.cancel()
        await asyncio.gather(*fills, return_exceptions=True)
        await self.remote.close()
