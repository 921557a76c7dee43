"""Pure request-target parsing: URL path -> UnitKey, or a Rejection with a status and reason.

Nothing here touches the network, the disk or the configuration: the result names a unit
the proxy may fetch, built only from segments that passed strict name rules, so no request
can reach a file outside the store or a host that is not a configured upstream.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass
from urllib.parse import unquote

from condaproxy.conda.when import When, parse_when


class Kind(enum.StrEnum):
    """What a unit is; decides mutability and how it is verified."""

    REPODATA = "repodata"
    SHARD_INDEX = "shard_index"
    SHARD = "shard"
    PACKAGE = "package"
    OTHER = "other"

    @property
    def immutable(self) -> bool:
        """Packages and shards never change once published; everything else may."""
        return self in _IMMUTABLE  # asked several times per request: a set, not Kind.X look-ups


_IMMUTABLE = frozenset({Kind.PACKAGE, Kind.SHARD})


@dataclass(frozen=True, slots=True)
class UnitKey:
    """One file of one channel: the unit the catalog, the lock table and the store key on."""

    channel: str
    subdir: str  # "" for channel-root files such as channeldata.json
    filename: str  # may be "shards/<sha256>.msgpack.zst"
    kind: Kind

    @property
    def path(self) -> str:
        """The path below the channel's base URL."""
        return f"{self.subdir}/{self.filename}" if self.subdir else self.filename

    def __str__(self) -> str:
        return f"{self.channel}/{self.path}"


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request: the unit plus the client's token, kept apart so it never reaches a key."""

    key: UnitKey
    token: str | None = None
    when: When | None = None  # /@<when>/...: the channel as it was then


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request target the proxy refuses, with the status and a one-line reason."""

    status: int
    reason: str


# CEP-26 style names: lowercase ASCII letters, digits and . _ -, not starting with a dot.
_CHANNEL_SEGMENT = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
# conda's subdirs: noarch, or <os>-<arch> for the operating systems conda knows; a plain
# "<word>-<word>" pattern would also match channel names such as conda-forge.
_SUBDIR = re.compile(r"noarch|(?:linux|osx|win|zos|emscripten|wasi|freebsd|unknown)-[a-z0-9_]+")
# Package file names: name-version-build.ext; versions may carry + ! and uppercase letters.
_FILENAME = re.compile(r"[A-Za-z0-9_+!][A-Za-z0-9._+!-]{0,254}")
_SHARD = re.compile(r"[0-9a-f]{64}\.msgpack\.zst")
_TOKEN = re.compile(r"[A-Za-z0-9._-]{1,256}")

REPODATA_NAMES = frozenset(
    {
        "repodata.json",
        "repodata.json.zst",
        "repodata.json.bz2",
        "repodata.json.gz",
        "current_repodata.json",
        "current_repodata.json.zst",
        "current_repodata.json.bz2",
        "repodata_from_packages.json",
        "repodata_from_packages.json.zst",
        "repodata_from_packages.json.bz2",
    }
)
SHARD_INDEX_NAME = "repodata_shards.msgpack.zst"
PACKAGE_SUFFIXES = (".conda", ".tar.bz2")
MAX_CHANNEL_SEGMENTS = 4


def kind_of(filename: str) -> Kind:
    """Classify a file name below a subdir."""
    if filename in REPODATA_NAMES:
        return Kind.REPODATA
    if filename == SHARD_INDEX_NAME:
        return Kind.SHARD_INDEX
    if filename.startswith("shards/"):
        return Kind.SHARD
    if filename.endswith(PACKAGE_SUFFIXES):
        return Kind.PACKAGE
    return Kind.OTHER


def _segments(raw_path: str) -> list[str] | Rejection:
    """Split the raw (still percent-encoded) path and decode each segment on its own."""
    if not raw_path.startswith("/"):
        # Absolute-form targets (GET http://host/...) are never followed anywhere.
        return Rejection(400, "request target must be a path")
    if "?" in raw_path or "#" in raw_path:
        return Rejection(400, "query strings are not accepted")
    if "\\" in raw_path:
        return Rejection(400, "backslash in path")
    parts = raw_path[1:].split("/")
    decoded = []
    for part in parts:
        try:
            # errors="strict" refuses overlong or invalid UTF-8 instead of replacing it.
            seg = unquote(part, encoding="utf-8", errors="strict")
        except UnicodeDecodeError:
            return Rejection(400, "path is not valid UTF-8")
        if seg in ("", ".", ".."):
            return Rejection(400, "empty, '.' or '..' path segment")
        if any(c in seg for c in "/\\%\x00;") or not seg.isascii() or not seg.isprintable():
            return Rejection(400, "forbidden character in path segment")
        decoded.append(seg)
    return decoded


# Parsing is pure and its answers frozen: the paths of hot units are parsed once, not per hit.
# Only short paths are kept, so the memory it takes stays bounded whatever clients send.
_MEMO_ENTRIES = 4096
_MEMO_PATH = 512


def parse_path(raw_path: str) -> Request | Rejection:
    """Turn a raw request path into the unit it names, or say why not."""
    if len(raw_path) > _MEMO_PATH:
        return _parse(raw_path)
    return _parse_memo(raw_path)


def _parse(raw_path: str) -> Request | Rejection:
    segs = _segments(raw_path)
    if isinstance(segs, Rejection):
        return segs
    token = None
    when = None
    # conda puts its token after a channel_alias's path (/@when/t/<token>/...); accept both orders.
    for _ in range(2):
        if segs and segs[0].startswith("@") and when is None:
            when = parse_when(segs[0][1:])
            if when is None:
                return Rejection(404, "a view is /@<YYYY-MM-DD | RFC 3339 time | age such as 7d>/...")
            segs = segs[1:]
        elif len(segs) >= 2 and segs[0] == "t" and token is None:
            if not _TOKEN.fullmatch(segs[1]):
                return Rejection(400, "malformed token segment")
            token, segs = segs[1], segs[2:]
    if segs and (segs[0] == "t" or segs[0].startswith("@")):
        return Rejection(400, "nested token or view segment")
    if len(segs) < 2:
        return Rejection(404, "expected /<channel>/<subdir>/<file>")

    filename = segs[-1]
    rest = segs[:-1]
    if len(rest) >= 2 and rest[-1] == "shards":
        if not _SHARD.fullmatch(filename):
            return Rejection(404, "shard names are <sha256>.msgpack.zst")
        filename = f"shards/{filename}"
        rest = rest[:-1]
    elif not _FILENAME.fullmatch(filename):
        return Rejection(400, "malformed file name")

    subdir = ""
    if len(rest) >= 2 and _SUBDIR.fullmatch(rest[-1]):
        subdir, rest = rest[-1], rest[:-1]
    elif filename.startswith("shards/") or kind_of(filename) is not Kind.OTHER:
        return Rejection(404, "expected /<channel>/<subdir>/<file>")
    if not 1 <= len(rest) <= MAX_CHANNEL_SEGMENTS:
        return Rejection(404, "expected /<channel>/<subdir>/<file>")
    for seg in rest:
        if not _CHANNEL_SEGMENT.fullmatch(seg):
            return Rejection(400, "channel names are lowercase letters, digits, '.', '_', '-'")
    channel = "/".join(rest)
    return Request(UnitKey(channel, subdir, filename, kind_of(filename)), token, when)


def package_name(filename: str) -> str:
    """The package name of name-version-build.conda / .tar.bz2."""
    return package_parts(filename)[0]


def package_parts(filename: str) -> tuple[str, str, str]:
    """(name, version, build) of name-version-build.conda / .tar.bz2 (conda forbids '-' in the last two)."""
    stem = filename.removesuffix(".conda").removesuffix(".tar.bz2")
    parts = stem.rsplit("-", 2)
    while len(parts) < 3:
        parts.append("")
    return parts[0], parts[1], parts[2]


_parse_memo = functools.lru_cache(maxsize=_MEMO_ENTRIES)(_parse)
