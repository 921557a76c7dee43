"""Hot small blobs kept in memory: a warm hit of a shard or a small package is answered without
an executor hop (open + fstat) or a sendfile, the two costs that dominated small hits.

Entries are keyed by blob key, which is the blob's sha256: the bytes under a key never change,
so an entry can never disagree with the store. An entry is used only for a row the catalog
gives as complete with that blob key and size, so complete-or-invisible holds as it does for
the store: a removed or evicted row is not served, whatever memory still holds. A blob enters
on its first hit served from the store (read whole in the executor, in the one hop sendfile's
open took), so a blob damaged or lost before it was ever hit is still noticed there.
"""

from __future__ import annotations

from cachetools import LRUCache

# Blobs up to this size are read whole and kept; larger ones are sent with sendfile.
MAX_BLOB = 64 * 1024
# Bytes of blobs kept at most (cachetools bounds the sum of sizes, least recently used out).
DEFAULT_BUDGET = 64 * 1024 * 1024


class HotBlobs:
    """A byte-bounded LRU of small blobs' bytes, keyed by blob key (sha256)."""

    def __init__(self, budget: int = DEFAULT_BUDGET, max_blob: int = MAX_BLOB) -> None:
        self.max_blob = min(max_blob, budget)
        self._blobs: LRUCache[str, bytes] = LRUCache(maxsize=max(budget, 1), getsizeof=len)

    def fits(self, size: int) -> bool:
        """Whether a blob of size bytes is served from memory."""
        return 0 < size <= self.max_blob

    def get(self, blob_key: str, size: int) -> bytes | None:
        """The blob's bytes if held (and of the size the row says), else None."""
        data = self._blobs.get(blob_key)
        if data is None or len(data) != size:
            return None
        return data

    def put(self, blob_key: str, data: bytes) -> None:
        """Keep data for blob_key when it fits."""
        if self.fits(len(data)):
            self._blobs[blob_key] = data

    def discard(self, blob_key: str) -> None:
        """Forget blob_key (its blob was deleted from the store)."""
        self._blobs.pop(blob_key, None)

    def __len__(self) -> int:
        return len(self._blobs)

    @property
    def size(self) -> int:
        """Bytes held."""
        return int(self._blobs.currsize)
