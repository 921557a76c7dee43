"""The default blob store: files under <cache>/blobs/<2 hex>/<sha256>, written crash-safely."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

from condaproxy.errors import BlobDamaged
from condaproxy.store.blobstore import check_key
from condaproxy.store.files import fsync_dir, open_fd, opened

CHUNK = 256 * 1024


class FilesystemStore:
    """Content-addressed files; put() is fsync(file) -> link/rename -> fsync(dir)."""

    shared = False

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        check_key(key)
        return self.root / key[:2] / key

    def _put_sync(self, key: str, src: Path) -> None:
        final = self._path(key)
        with open(src, "rb") as f:
            os.fsync(f.fileno())
        final.parent.mkdir(exist_ok=True)
        try:
            # A hard link keeps src valid for readers still streaming from it, and is
            # atomic: the final name never points at a partial file.
            os.link(src, final)
        except FileExistsError:
            if final.stat().st_size == os.stat(src).st_size:
                return  # content-addressed: the same bytes are already there
            # A damaged blob (truncated on disk) must not be trusted for its name: replace it.
            self._install(src, final, link=True)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            self._install(src, final, link=False)
        fsync_dir(final.parent)

    @staticmethod
    def _install(src: Path, final: Path, *, link: bool) -> None:
        """Put src's bytes at final through a name beside it, then an atomic rename."""
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            if link:
                os.link(src, tmp)
            else:  # another filesystem (or no hard links): a copy
                shutil.copyfile(src, tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not leave half a blob behind
            raise

    async def put(self, key: str, src: Path) -> None:
        """Durably store the bytes of src under key; src stays where it is."""
        await asyncio.get_running_loop().run_in_executor(None, self._put_sync, key, src)

    async def delete(self, key: str) -> None:
        """Remove the blob; a missing blob is not an error."""
        path = self._path(key)
        await asyncio.get_running_loop().run_in_executor(None, lambda: path.unlink(missing_ok=True))

    async def size(self, key: str) -> int | None:
        """The stored size, or None when the blob is missing."""
        path = self._path(key)

        def stat() -> int | None:
            try:
                return path.stat().st_size
            except FileNotFoundError:
                return None

        return await asyncio.get_running_loop().run_in_executor(None, stat)

    def local_path(self, key: str) -> Path | None:
        """The file holding the blob (it may have vanished since the catalog said so)."""
        return self._path(key)

    def keep_local(self, key: str, size: int) -> None:
        """Every blob is local already."""

    async def presign(self, key: str, ttl: int) -> str | None:
        """Local files have no URL of their own."""
        return None

    async def read(
        self, key: str, offset: int, count: int, *, size: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Stream count bytes of the blob from offset (size: see BlobStore.read)."""
        loop = asyncio.get_running_loop()
        fd = await opened(open_fd(self._path(key), os.O_RDONLY), os.close)
        try:
            if size is not None and (have := os.fstat(fd).st_size) != size:
                raise BlobDamaged(f"blob {key} is {have} bytes, its row says {size}")
            while count > 0:
                chunk = await loop.run_in_executor(None, os.pread, fd, min(CHUNK, count), offset)
                if not chunk:
                    raise EOFError(f"blob {key} is shorter than expected")
                offset += len(chunk)
                count -= len(chunk)
                yield chunk
        finally:
            os.close(fd)

    async def keys(self) -> AsyncIterator[str]:
        """Every key in the store."""
        loop = asyncio.get_running_loop()
        names = await loop.run_in_executor(
            None, lambda: [p.name for p in self.root.glob("??/*") if not p.name.startswith(".")]
        )
        for name in names:
            yield name

    async def remove_partials(self) -> list[str]:
        """Delete copies a put left half-made (run at startup, when no put is in progress)."""

        def sweep() -> list[str]:
            removed = []
            for path in self.root.glob("??/.*.tmp"):
                path.unlink(missing_ok=True)
                removed.append(path.name)
            return removed

        return await asyncio.get_running_loop().run_in_executor(None, sweep)

    async def close(self) -> None:
        """Nothing to release."""
