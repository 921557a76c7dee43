"""Pure conditional-request and Range logic (RFC 9110 sections 13 and 14).

Given the request's method and headers and what we know of the representation, decide the
status and the byte window to send. No I/O: the streamer carries the plan out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
# Positions are read from at most 18 digits: longer ones are past any real file, and int()
# of thousands of digits would raise (Python's int-string limit) or waste time.
_MAX_DIGITS = 18
_HUGE = 10**_MAX_DIGITS
_ETAG = re.compile(r'\s*(W/)?("[^"]*"|\*)\s*(?:,|$)')


@dataclass(frozen=True, slots=True)
class Plan:
    """The answer to send: status, the byte window [offset, offset+count), extra headers."""

    status: int
    offset: int = 0
    count: int | None = None  # None: to the end (size may be unknown yet)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def has_body(self) -> bool:
        """304 and 416 carry no representation bytes."""
        return self.status in (200, 206)


def _http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    # asctime and "-0000" forms parse naive; HTTP dates are always UTC (RFC 9110 5.6.7).
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _etags(value: str) -> list[tuple[bool, str]] | None:
    """Parse an entity-tag list into (weak, tag) pairs; None if malformed."""
    out = []
    pos = 0
    value = value.strip()
    while pos < len(value):
        m = _ETAG.match(value, pos)
        if not m:
            return None
        out.append((bool(m.group(1)), m.group(2)))
        pos = m.end()
    return out


def _opaque(etag: str) -> tuple[bool, str]:
    return (etag.startswith("W/"), etag.removeprefix("W/"))


def none_match(header: str, etag: str | None) -> bool:
    """If-None-Match uses weak comparison: does the header name our current tag (or '*')?"""
    tags = _etags(header)
    if not tags:
        return False
    if any(t == "*" for _, t in tags):
        return True  # we only ever answer for a representation that exists
    return etag is not None and any(t == _opaque(etag)[1] for _, t in tags)


def not_modified(headers: Mapping[str, str], etag: str | None, last_modified: str | None) -> bool:
    """True when a GET/HEAD should be answered 304 (If-None-Match first, else If-Modified-Since)."""
    inm = headers.get("If-None-Match")
    if inm is not None:
        return none_match(inm, etag)
    ims = _http_date(headers.get("If-Modified-Since"))
    if ims is None:
        return False  # the stored date is parsed only when there is one to compare it with
    lm = _http_date(last_modified)
    return lm is not None and lm <= ims


def _if_range_ok(value: str, etag: str | None, last_modified: str | None) -> bool:
    # If-Range needs a strong match, or an exact date equal to Last-Modified.
    if value.startswith(('"', "W/")):
        return etag is not None and not etag.startswith("W/") and value.strip() == etag
    date = _http_date(value)
    lm = _http_date(last_modified)
    return date is not None and lm is not None and date == lm


def _position(digits: str) -> int:
    return _HUGE if len(digits.lstrip("0")) > _MAX_DIGITS else int(digits)


def byte_window(range_header: str, size: int) -> tuple[int, int] | bool | None:
    """(offset, count) for a single satisfiable range, False if unsatisfiable, None to ignore.

    Multiple ranges and malformed values are ignored (a 200 with the whole body is always a
    valid answer); only a well-formed single range past the end is unsatisfiable.
    """
    m = _RANGE.fullmatch(range_header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last N bytes
        n = _position(last)
        if size == 0:
            return None  # nothing to take the tail of: the whole (empty) body will do
        if n == 0:
            return False
        n = min(n, size)
        return (size - n, n)
    start = _position(first)
    end = _position(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return False
    end = min(end, size - 1)
    return (start, end - start + 1)


def plan(
    method: str,
    headers: Mapping[str, str],
    size: int | None,
    etag: str | None,
    last_modified: str | None,
) -> Plan:
    """Decide status and byte window for a GET/HEAD of a representation."""
    if not_modified(headers, etag, last_modified):
        return Plan(304)
    rng = headers.get("Range")
    if rng is None or size is None or method not in ("GET", "HEAD"):
        return Plan(200)
    if_range = headers.get("If-Range")
    if if_range is not None and not _if_range_ok(if_range, etag, last_modified):
        return Plan(200)
    window = byte_window(rng, size)
    if window is None:
        return Plan(200)
    if window is False:
        return Plan(416, headers={"Content-Range": f"bytes */{size}"})
    assert isinstance(window, tuple)
    offset, count = window
    return Plan(206, offset, count, {"Content-Range": f"bytes {offset}-{offset + count - 1}/{size}"})
