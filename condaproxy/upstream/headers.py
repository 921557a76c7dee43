"""Which upstream response headers reach clients, under one canonical spelling each."""

from __future__ import annotations

from multidict import CIMultiDictProxy

# Hop-by-hop and per-response headers we never replay (RFC 9110 7.6.1), plus those the proxy
# sets itself (Cache-Control, Date, Age, length and range framing).
DROPPED_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Set-Cookie",
        "Date",
        "Age",
        "Cache-Control",
        "Expires",
        "Content-Length",
        "Content-Range",
        "Accept-Ranges",
        "Server",
        "Via",
        "Alt-Svc",
        "Strict-Transport-Security",
        "X-Cache",
        "Pragma",
    )
)


_SPECIAL_CASE = {"etag": "ETag", "www-authenticate": "WWW-Authenticate", "content-md5": "Content-MD5"}


def canonical(name: str) -> str:
    """One spelling per header name, so plain-dict look-ups (ETag, Last-Modified) are reliable."""
    lower = name.lower()
    return _SPECIAL_CASE.get(lower) or "-".join(part.capitalize() for part in lower.split("-"))


def passthrough_headers(headers: CIMultiDictProxy[str]) -> dict[str, str]:
    """The upstream's end-to-end headers that a client should see, under canonical names."""
    out: dict[str, str] = {}
    for raw, value in headers.items():
        if raw.lower() in DROPPED_HEADERS:
            continue
        name = canonical(raw)
        out[name] = value if name not in out else f"{out[name]}, {value}"
    return out
