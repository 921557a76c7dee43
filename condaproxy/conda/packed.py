"""zstd-compressed msgpack documents (CEP-16 shard indexes and shards), read within bounds.

A hostile document can inflate 3 KB into 100 MB of one-byte maps, which msgpack.unpackb turns
into gigabytes of Python objects while it holds the GIL. Real documents can be large too (conda
accepts a 64 MiB shard and a 128 MiB index, and conda-pypi needs most of that), so a cap on
bytes alone does not bound memory. Here a document is inflated as a stream, up to its cap, and
walked with a Cursor: whatever the caller does not keep is skipped inside the unpacker without
building any object; only scalars (keys, digests, sizes) and entries of a bounded encoded size
(one record, the index's info map) become Python objects. Memory stays at a few MiB whatever the
document; the work is one pass over its bytes.

Synchronous, for an executor thread.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, cast

import msgpack
import zstandard

from condaproxy.conda.decoding import Bounded
from condaproxy.errors import RefusedDocument

# A zstd frame may ask for a decoder window of up to 2 GiB, allocated before any byte comes out.
# Shards and indexes are written with a few MiB; conda refuses more than 16 MiB for them too.
MAX_WINDOW = 16 * 1024 * 1024
# Per-object bounds: the longest string or bin value, and the most entries one map or array
# header may announce (conda-pypi's index names several hundred thousand packages).
MAX_STR = 1 << 20
MAX_LEN = 1 << 22
# The most encoded bytes one entry unpacked whole may have (a record, the info map): real ones
# are a few KiB.
MAX_ENTRY = 256 * 1024

_READ = 64 * 1024
_BUFFER = 2 * MAX_STR  # the unpacker's own buffer: room for the longest string and its header
# Bytes the tape keeps behind what it handed out: the unpacker's unread buffer plus one entry.
_KEEP = _BUFFER + MAX_ENTRY + _READ


class Kind(enum.Enum):
    """What the next object is, from its first byte (the msgpack type byte)."""

    MAP = "map"
    ARRAY = "array"
    STR = "str"
    BIN = "bin"
    NIL = "nil"
    OTHER = "other"  # numbers, booleans, ext


def _kind(byte: int) -> Kind:
    if 0x80 <= byte <= 0x8F or byte in (0xDE, 0xDF):
        return Kind.MAP
    if 0x90 <= byte <= 0x9F or byte in (0xDC, 0xDD):
        return Kind.ARRAY
    if 0xA0 <= byte <= 0xBF or 0xD9 <= byte <= 0xDB:
        return Kind.STR
    if 0xC4 <= byte <= 0xC6:
        return Kind.BIN
    return Kind.NIL if byte == 0xC0 else Kind.OTHER


_KINDS = tuple(_kind(b) for b in range(256))


class _Tape:
    """The inflated bytes on their way to the unpacker, keeping the last _KEEP it handed out.

    The cursor looks back at bytes the unpacker already holds (the type byte of the next object,
    an entry it just skipped); they are never more than _KEEP behind what was handed out.
    """

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        self._data = bytearray()
        self._start = 0  # stream offset of _data[0]
        self._handed = 0  # bytes given to the unpacker so far

    def read(self, size: int) -> bytes:
        """The unpacker's reads."""
        self._fill(self._handed + size)
        at = self._handed - self._start
        out = bytes(self._data[at : at + size])
        self._handed += len(out)
        drop = self._handed - _KEEP - self._start
        if drop > 0:
            del self._data[:drop]  # from the front of a bytearray: no copy of the rest
            self._start += drop
        return out

    def at(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the stream (fewer at its end), reading ahead if need be."""
        self._fill(end)
        if start < self._start:
            raise RuntimeError(f"bytes from {start} were already dropped (kept from {self._start})")
        return bytes(self._data[start - self._start : end - self._start])

    def _fill(self, end: int) -> None:
        while self._start + len(self._data) < end:
            chunk = self._inner.read(max(_READ, end - self._start - len(self._data)))
            if not chunk:
                return
            self._data += chunk


class Cursor:
    """Walks one msgpack document object by object, building only what the caller asks for."""

    def __init__(self, stream: IO[bytes], what: str) -> None:
        self.what = what
        self._tape = _Tape(stream)
        self._unpacker = msgpack.Unpacker(
            self._tape,
            raw=False,
            strict_map_key=False,
            read_size=_READ,
            max_buffer_size=_BUFFER,
            max_str_len=MAX_STR,
            max_bin_len=MAX_STR,
            max_ext_len=MAX_STR,
            max_array_len=MAX_LEN,
            max_map_len=MAX_LEN,
        )

    def kind(self) -> Kind | None:
        """What the next object is; None at the end of the document."""
        pos = self.tell()
        first = self._tape.at(pos, pos + 1)
        return _KINDS[first[0]] if first else None

    def tell(self) -> int:
        """Offset of the next object in the inflated document."""
        return int(self._unpacker.tell())

    def map_len(self) -> int:
        """Enter a map: how many key/value pairs follow (ValueError if the next object is none)."""
        if self.kind() is not Kind.MAP:
            raise ValueError(f"{self.what}: a map was expected")
        with self._translated():
            count = int(self._unpacker.read_map_header())
        if count > MAX_LEN:  # read_map_header does not apply max_map_len
            raise RefusedDocument("objects", f"{self.what}: a map of {count} entries (past {MAX_LEN})")
        return count

    def skip(self) -> None:
        """Pass over the next object without building it."""
        with self._translated():
            self._unpacker.skip()

    def scalar(self) -> Any:
        """The next object if it is no map or array (those are skipped: None)."""
        if self.kind() in (Kind.MAP, Kind.ARRAY):
            self.skip()
            return None
        with self._translated():
            return self._unpacker.unpack()

    def key(self) -> str | None:
        """The next object if it is a string; anything else is skipped (None)."""
        if self.kind() is not Kind.STR:
            self.skip()
            return None
        return cast(str, self.scalar())

    def entry(self) -> Any:
        """The next object, built whole: RefusedDocument if it takes more than MAX_ENTRY bytes."""
        start = self.tell()
        self.skip()
        end = self.tell()
        if end - start > MAX_ENTRY:
            message = f"{self.what}: an entry of {end - start} bytes (past {MAX_ENTRY})"
            raise RefusedDocument("objects", message)
        return msgpack.unpackb(self._tape.at(start, end), raw=False, strict_map_key=False)

    def span(self) -> tuple[int, int]:
        """Skip the next object; where it began and ended."""
        start = self.tell()
        self.skip()
        return start, self.tell()

    def finish(self) -> None:
        """The document must end here (ValueError if anything follows)."""
        if self.kind() is not None:
            raise ValueError(f"{self.what}: extra data after the document")

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """msgpack's errors as ours: a bound broken is a refusal, anything else malformed data."""
        try:
            yield
        except RefusedDocument:
            raise
        except msgpack.OutOfData as exc:
            raise ValueError(f"{self.what}: truncated") from exc
        except msgpack.BufferFull as exc:  # one string or bin larger than the buffer: past MAX_STR
            raise RefusedDocument("objects", f"{self.what}: an object of more than {_BUFFER} bytes") from exc
        except msgpack.StackError as exc:
            raise RefusedDocument("depth", f"{self.what}: nested too deep") from exc
        except ValueError as exc:
            # msgpack says "<n> exceeds max_<kind>_len(<limit>)" and has no class of its own for it.
            if "exceeds max_" in str(exc):
                raise RefusedDocument("objects", f"{self.what}: {exc}") from exc
            raise


@contextmanager
def open_packed(path: Path, limit: int, what: str) -> Iterator[Cursor]:
    """A cursor over a zstd-compressed msgpack file, refused once it inflates past limit bytes."""
    decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    with open(path, "rb") as raw, decompressor.stream_reader(raw) as inflated:
        bounded = Bounded(cast(IO[bytes], inflated), limit, f"{what} inflates")
        yield Cursor(cast(IO[bytes], bounded), what)
