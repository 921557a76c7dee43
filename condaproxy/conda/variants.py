"""Repodata variants: which files form one group, what derives from what, and the transcoding.

`repodata.json`, `.json.zst` and `.json.bz2` are one document in three encodings (likewise
`current_repodata.json*`). When upstream lacks a variant a client asks for, the proxy makes it
from one upstream has, so a client never hears 404 for a document that exists. Content-coded
representations of `repodata.json` (gzip, zstd) are derived units too, under internal names
(`repodata.json@gzip`) that no request path can spell. Transcoding streams: bounded memory.
"""

from __future__ import annotations

import bz2
import gzip
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, cast

import zstandard

from condaproxy.conda.decoding import open_decoded

BASES = ("repodata.json", "current_repodata.json")
SUFFIXES = ("", ".zst", ".bz2")
CODINGS = ("zstd", "gzip")  # Content-Encoding we offer for repodata.json, best first
_STEP = 1 << 20

CONTENT_TYPES = {"": "application/json", ".zst": "application/zstd", ".bz2": "application/x-bzip2"}


def split(filename: str) -> tuple[str, str, str | None] | None:
    """(base, suffix, content coding) of a variant name, or None if it is not one."""
    name, _, coding = filename.partition("@")
    if coding and coding not in CODINGS:
        return None
    for base in BASES:
        for suffix in SUFFIXES:
            if name == base + suffix:
                if coding and suffix:
                    return None
                return base, suffix, coding or None
    return None


def is_internal(filename: str) -> bool:
    """Names of derived content-coded representations: never fetched from upstream."""
    return "@" in filename


def siblings(filename: str) -> list[str]:
    """The other upstream variants in filename's group (they must stay in step with it)."""
    parts = split(filename)
    if parts is None or parts[2] is not None:
        return []
    return [parts[0] + s for s in SUFFIXES if parts[0] + s != filename]


def sources(filename: str) -> list[str]:
    """Variants to derive filename from, best first (cheapest to decode)."""
    parts = split(filename)
    if parts is None:
        return []
    base, suffix, coding = parts
    if coding is not None:
        return [base]  # encode the identity document
    order = [base + s for s in (".zst", "", ".bz2") if s != suffix]
    if base == "current_repodata.json":
        # repodata.json is a superset of current_repodata.json: a valid stand-in for it.
        order += ["repodata.json.zst", "repodata.json", "repodata.json.bz2"]
    return order


def content_type(filename: str) -> str:
    """The Content-Type of a derived variant."""
    parts = split(filename)
    return CONTENT_TYPES[parts[1]] if parts else "application/octet-stream"


def accepted_codings(accept_encoding: str | None) -> list[str]:
    """Our codings the client accepts (RFC 9110 12.5.3: q=0 refuses), in our preference order."""
    if not accept_encoding:
        return []
    accepted: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        accepted[name.strip().lower()] = q
    wildcard = accepted.get("*", 0.0)
    return [c for c in CODINGS if accepted.get(c, wildcard) > 0]


@contextmanager
def encoder(path: Path, filename: str) -> Iterator[IO[bytes]]:
    """A writable stream that encodes into path as filename's suffix or coding says."""
    parts = split(filename)
    suffix, coding = (parts[1], parts[2]) if parts else ("", None)
    if suffix == ".zst" or coding == "zstd":
        with open(path, "wb") as raw, zstandard.ZstdCompressor(level=10, threads=-1).stream_writer(raw) as z:
            yield cast(IO[bytes], z)
    elif suffix == ".bz2":
        with bz2.open(path, "wb", compresslevel=9) as b:
            yield cast(IO[bytes], b)
    elif coding == "gzip":
        with gzip.open(path, "wb", compresslevel=6) as g:
            yield cast(IO[bytes], g)
    else:
        with open(path, "wb") as f:
            yield f


def transcode(src: Path, src_name: str, dst: Path, dst_name: str) -> None:
    """Write dst (encoded as dst_name says) from src (decoded as src_name says), streaming."""
    name = src_name.partition("@")[0]
    with open_decoded(src, name) as reader, encoder(dst, dst_name) as writer:
        shutil.copyfileobj(reader, writer, _STEP)
