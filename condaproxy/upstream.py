"""The upstream client: one aiohttp session, conditional GETs, errors mapped to our own.

Requests for shared fetches carry no client header (no Range, no Authorization, no client
validators): what is fetched once is fetched for everybody. Only configured upstream bases are
ever contacted; redirects are followed only to https (or to the same origin) and at most a few.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from condaproxy import __version__
from condaproxy.config import ChannelConfig
from condaproxy.errors import (
    UpstreamError,
    UpstreamNotFound,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
USER_AGENT = f"condaproxy/{__version__}"

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


@dataclass(frozen=True, slots=True)
class Validators:
    """What we hold of a cached copy, for a conditional request."""

    etag: str | None = None
    last_modified: str | None = None


def _redirect_allowed(origin: URL, target: URL) -> bool:
    if target.origin() == origin.origin():
        return True
    if target.scheme != "https" or not target.host:
        return False
    try:
        addr = ipaddress.ip_address(target.host)
    except ValueError:
        return True
    return not (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved)


class Upstream:
    """Opens upstream responses; the caller reads the body and must release the response."""

    def __init__(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=32, ttl_dns_cache=300),
            auto_decompress=False,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            # Bodies may be large and slow; per-phase timeouts are set per request.
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def close(self) -> None:
        """Close the session and its connections."""
        await self._session.close()

    async def open(
        self, url: str, channel: ChannelConfig, validators: Validators | None = None
    ) -> aiohttp.ClientResponse:
        """GET url; returns a 200 or 304 response with its body unread, or raises UpstreamError."""
        headers: dict[str, str] = {}
        if validators is not None:
            if validators.etag:
                headers["If-None-Match"] = validators.etag
            if validators.last_modified:
                headers["If-Modified-Since"] = validators.last_modified
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=channel.connect_timeout, sock_read=channel.read_timeout
        )
        origin = URL(url)
        target = origin
        try:
            async with asyncio.timeout(channel.connect_timeout):
                for _ in range(MAX_REDIRECTS + 1):
                    resp = await self._session.get(
                        target, headers=headers, timeout=timeout, allow_redirects=False
                    )
                    if resp.status not in (301, 302, 303, 307, 308):
                        break
                    location = resp.headers.get("Location")
                    resp.release()
                    if not location:
                        raise UpstreamUnavailable(f"upstream redirect without Location ({resp.status})")
                    target = target.join(URL(location))
                    if not _redirect_allowed(origin, target):
                        raise UpstreamUnavailable("upstream redirected to a disallowed location")
                else:
                    raise UpstreamUnavailable("too many upstream redirects")
        except TimeoutError as exc:
            raise UpstreamTimeout("upstream did not answer in time") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnavailable(f"upstream unreachable: {exc.os_error.strerror or exc}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream error: {type(exc).__name__}") from exc
        return check_status(resp)


def check_status(resp: aiohttp.ClientResponse) -> aiohttp.ClientResponse:
    """Pass 200/304 through; map every other status to an UpstreamError (releasing resp)."""
    if resp.status in (200, 304):
        return resp
    resp.release()
    status = resp.status
    error: UpstreamError
    if status in (404, 410):
        error = UpstreamNotFound(f"not found upstream ({status})")
    elif 400 <= status < 500:
        error = UpstreamRefused(status, f"upstream refused the request ({status})")
    else:
        error = UpstreamUnavailable(f"upstream answered {status}")
    raise error
