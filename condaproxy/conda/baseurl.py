"""CEP-15 `info.base_url`: repodata whose packages live elsewhere, rewritten so clients come back.

A repodata document may say its packages live at `<base_url><filename>` (a CDN, another host).
Passed through as it is, clients would fetch packages from there and bypass the proxy. So the
head of every repodata body is read as it arrives (indexers write `info` first) before any byte
goes out (one whose head runs out before its `info` does is held back whole: lateinfo.py). A
document whose `info` names a foreign base is held back whole and served as a copy whose
base_url is "" (CEP-15: beside the repodata); the upstream base goes into the catalog and
package requests are mapped back to it. Every other document streams on, unchanged.
"""

from __future__ import annotations

import bz2
import enum
import json
import logging
import re
import shutil
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast
from urllib.parse import urljoin, urlsplit

import zstandard

from condaproxy.conda import variants
from condaproxy.conda.decoding import MAX_DEPTH, STEP, open_decoded
from condaproxy.conda.urls import redacted_url

log = logging.getLogger(__name__)

# How much decoded JSON is read, at most, before deciding: `info` comes first and is tiny.
HEAD_LIMIT = 256 * 1024


class Verdict(enum.Enum):
    """What a repodata head says about where its packages live."""

    PENDING = "pending"  # not enough of the head yet
    PLAIN = "plain"  # info names no foreign base: served as it is, any mapping forgotten
    FOREIGN = "foreign"  # info names a foreign base: rewritten, the base recorded
    UNKNOWN = "unknown"  # no info in the head (or not JSON at all): served as it is, mapping kept
    LATE = "late"  # an object whose info is not in the head: held back whole, read once in


def foreign_base(location: str, value: str) -> str | None:
    """The base a client would fetch packages from when it is not beside the repodata, else None.

    location is the repodata's URL on the channel; a relative value resolves against its
    directory (as rattler does). Only a relative path landing on that very directory is left
    alone: a host or an absolute path would send clients elsewhere. ValueError: not http(s).
    """
    if not value:
        return None  # CEP-15: empty means beside the repodata
    here = urljoin(location, "./")
    resolved = urljoin(here, value)
    if urlsplit(resolved).scheme not in ("http", "https"):
        raise ValueError(f"unsupported base_url {value!r}")
    if not resolved.endswith("/"):
        resolved += "/"
    parts = urlsplit(value)
    if not (parts.scheme or parts.netloc or value.startswith("/")) and resolved == here:
        return None
    # Never a secret in the catalog or the log: open() puts the channel's own token back.
    return redacted_url(resolved)


# -- finding info.base_url in a document's head ----------------------------------------------------

_WS = re.compile(rb"[ \t\r\n]*")
_DELIMITER = re.compile(rb'[ \t\r\n{}\[\],:"]')
_QUOTE = ord('"')
_BACKSLASH = ord("\\")


class _Scan(enum.Enum):
    READING = "reading"
    INFO = "info"  # the top-level info object ended inside the head
    NONE = "none"  # it cannot be found: not an object, malformed, or the head ran out


@dataclass
class _Frame:
    is_map: bool
    info: bool = False  # the top-level "info" object
    key: str | None = None
    in_value: bool = False


class _Head:
    """The head of a JSON document, scanned as it arrives for the strings of `info.base_url`.

    A tokenizer, not a validator: it needs only where `info` ends and the byte spans of its
    base_url strings, so that the rewrite can replace those and copy every other byte as it is.
    A token is taken only once something follows it, so any chunking gives the same result; an
    unfinished one is searched on from where the last chunk ended, never from its start again
    (an upstream dripping a long string byte by byte must not cost quadratic time).
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.state = _Scan.READING
        self.spans: list[tuple[int, int]] = []
        self.values: list[str] = []
        self._pos = 0
        self._resume = 0  # how far the unfinished token at _pos was searched
        self._stack: list[_Frame] = []

    def feed(self, data: bytes, final: bool = False) -> None:
        """Scan data, the document's next bytes (final: there are no more)."""
        self.data += data
        if self.state is _Scan.READING:
            self._scan(final)
        if final and self.state is _Scan.READING:
            self.state = _Scan.NONE

    def _scan(self, final: bool) -> None:
        data, stack = self.data, self._stack
        while True:
            pos = self._pos = _WS.match(data, self._pos).end()  # type: ignore[union-attr]
            if pos == len(data):
                return
            char = bytes(data[pos : pos + 1])
            if not stack and char != b"{":
                self.state = _Scan.NONE  # not an object, or something after the document
                return
            if char == b'"':
                end = self._string_end(pos)
                if end is None:
                    return  # the string goes on in the next chunk
                try:
                    text = json.loads(data[pos:end])
                except ValueError:
                    self.state = _Scan.NONE
                    return
                self._string(text, pos, end)
            elif char in (b"{", b"["):
                parent = stack[-1] if stack else None
                info = char == b"{" and len(stack) == 1 and parent is not None and parent.key == "info"
                if len(stack) == MAX_DEPTH:
                    self.state = _Scan.NONE  # no real head nests this deep: not ours to read
                    return
                stack.append(_Frame(char == b"{", info=info))
                end = pos + 1
            elif char in (b"}", b"]"):
                if stack.pop().info:
                    self.state = _Scan.INFO
                    return
                end = pos + 1
            elif char == b":":
                stack[-1].in_value = True
                end = pos + 1
            elif char == b",":
                stack[-1].key, stack[-1].in_value = None, False
                end = pos + 1
            else:
                delimiter = _DELIMITER.search(data, max(pos, self._resume))
                if delimiter is None and not final:
                    self._resume = len(data)
                    return  # a number may go on in the next chunk
                end = delimiter.start() if delimiter else len(data)
            self._pos, self._resume = end, 0

    def _string_end(self, start: int) -> int | None:
        """Just past the closing quote of the string opening at start; None if not in yet."""
        data = self.data
        at = max(start + 1, self._resume)
        while (quote := data.find(_QUOTE, at)) != -1:
            before = quote - 1
            while data[before] == _BACKSLASH:
                before -= 1
            if (quote - 1 - before) % 2 == 0:  # not itself escaped
                return quote + 1
            at = quote + 1
        self._resume = len(data)
        return None

    def _string(self, text: str, start: int, end: int) -> None:
        frame = self._stack[-1]
        if frame.is_map and not frame.in_value:
            frame.key = text
        elif frame.info and frame.key == "base_url":
            self.spans.append((start, end))
            self.values.append(text)


# -- reading the head of a body as it arrives ------------------------------------------------------


class _Enough(Exception):
    """The decoded head is as long as it may get."""


class _Sink:
    """Where the zstd decoder writes: keeps up to room bytes, then stops the decoder."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.room = 0

    def write(self, data: bytes) -> int:
        """Keep what fits; raise _Enough once full (a decompression bomb never gets the memory)."""
        self.out += data[: self.room - len(self.out)]
        if len(self.out) >= self.room:
            raise _Enough
        return len(data)


class Sniffer:
    """Decodes the head of a repodata body (any variant encoding) and decides what it says.

    Synchronous and bounded, for an executor: it never holds more than HEAD_LIMIT decoded bytes.
    """

    def __init__(self, filename: str, location: str) -> None:
        parts = variants.split(filename)
        self._suffix = parts[1] if parts else ""
        self._location = location
        self._head: _Head | None = _Head()
        self._sink = _Sink()
        self._zstd = zstandard.ZstdDecompressor().stream_writer(cast(IO[bytes], self._sink))
        self._bz2 = bz2.BZ2Decompressor()
        self.verdict = Verdict.PENDING
        self.base: str | None = None  # set when the verdict is FOREIGN

    def feed(self, chunk: bytes, final: bool = False) -> Verdict:
        """Take the body's next bytes (final: the body ended); the verdict so far."""
        head = self._head
        if head is None:
            return self.verdict
        room = HEAD_LIMIT - len(head.data)
        try:
            decoded = self._decode(chunk, room)
        except (OSError, ValueError, EOFError, zstandard.ZstdError):
            return self._decide(Verdict.UNKNOWN)  # not our business: the client will find out
        full = len(decoded) >= room
        head.feed(decoded, final and not full)
        if head.state is _Scan.INFO:
            return self._decide(self._judge(head.values[-1] if head.values else ""))
        if head.state is _Scan.READING and full and not final:
            return self._decide(Verdict.LATE)  # a rare document: info may still come (lateinfo.py)
        if head.state is _Scan.NONE or full or final:
            return self._decide(Verdict.UNKNOWN)
        return self.verdict

    def _decode(self, chunk: bytes, room: int) -> bytes:
        """Up to room bytes of the document that chunk carries."""
        if self._suffix == ".zst":
            self._sink.out, self._sink.room = bytearray(), room
            with suppress(_Enough):  # the head is full: the decoder stops here for good
                self._zstd.write(chunk)
            return bytes(self._sink.out)
        if self._suffix == ".bz2":
            out = bytearray()
            data = chunk
            while len(out) < room:
                if self._bz2.eof:  # concatenated streams (pbzip2) are one document
                    data = self._bz2.unused_data + data
                    if not data:
                        break
                    self._bz2 = bz2.BZ2Decompressor()
                out += self._bz2.decompress(data, room - len(out))
                data = b""
                if self._bz2.needs_input and not self._bz2.eof:
                    break
            return bytes(out)
        return chunk[:room]

    def _judge(self, value: str) -> Verdict:
        try:
            self.base = foreign_base(self._location, value)
        except ValueError as exc:
            log.warning("%s: %s; passed through as it is", self._location, exc)
            return Verdict.PLAIN
        return Verdict.PLAIN if self.base is None else Verdict.FOREIGN

    def _decide(self, verdict: Verdict) -> Verdict:
        self.verdict = verdict
        self._head = None  # the head's memory goes now, not with the download
        return verdict


# -- rewriting a held body -------------------------------------------------------------------------


def _read_head(reader: IO[bytes]) -> bytes:
    parts = []
    size = 0
    while size < HEAD_LIMIT and (part := reader.read(HEAD_LIMIT - size)):
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def rewrite(src: Path, dst: Path, filename: str) -> None:
    """Write dst: src with every info.base_url string made "", same encoding, streaming.

    Only the head is decoded into memory; the rest is copied through in steps, so a
    repodata.json of hundreds of MB costs a few MB. Run it in an executor.
    """
    with open_decoded(src, filename) as reader, variants.encoder(dst, filename) as writer:
        head = _read_head(reader)
        scan = _Head()
        scan.feed(head, final=len(head) < HEAD_LIMIT)
        if scan.state is not _Scan.INFO or not scan.spans:
            raise ValueError("info.base_url is not in the document's head")
        done = 0
        for start, end in scan.spans:
            writer.write(head[done:start])
            writer.write(b'""')
            done = end
        writer.write(head[done:])
        shutil.copyfileobj(reader, writer, STEP)
