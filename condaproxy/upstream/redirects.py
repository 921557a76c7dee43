"""Where an upstream redirect may lead.

To the channel's own origins, always: a configured upstream may well live on 127.0.0.1 or 10.x.
Elsewhere only over https, and never into private networks, so that an upstream cannot turn the
proxy into a way of reaching internal hosts (a redirected repodata file is served as it is).
IP literals are checked here; host names are checked by PublicResolver as the connection is
made, so a name cannot resolve to a public address when checked and a private one when used.
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class DisallowedAddress(OSError):
    """A host name of another origin resolved only to non-public addresses."""


def same_origin(a: URL, b: URL) -> bool:
    """RFC 6454 origin equality: scheme, host and port."""
    return (a.scheme, a.raw_host, a.port) == (b.scheme, b.raw_host, b.port)


def is_public(host: str) -> bool:
    """Whether an IP address is globally routable (not loopback, private, link-local, ...)."""
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


def refusal(target: URL) -> str | None:
    """Why a redirect to target, on an origin not the channel's own, must not be followed; else None."""
    if target.scheme != "https":
        return "a non-https URL on another origin"
    if not target.raw_host:
        return "a URL without a host"
    try:
        public = is_public(target.raw_host)
    except ValueError:
        return None  # a host name: PublicResolver checks what it resolves to
    return None if public else "a non-public address"


class PublicResolver(AbstractResolver):
    """Resolves host names to their public addresses only; for origins not configured."""

    def __init__(self) -> None:
        self._inner: AbstractResolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The inner resolver's answer less any non-public address; DisallowedAddress if none is left."""
        public = [r for r in await self._inner.resolve(host, port, family) if is_public(r["host"])]
        if not public:
            raise DisallowedAddress(f"{host} resolves only to non-public addresses")
        return public

    async def close(self) -> None:
        """Release the inner resolver."""
        await self._inner.close()
