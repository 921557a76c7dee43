"""Where an upstream redirect may lead.

To the channel's own origins, always: a configured upstream may well live on 127.0.0.1 or 10.x;
so may the origins its section trusts (trusted_origins). Elsewhere only over https, and never
into private networks, so that an upstream cannot turn the proxy into a way of reaching internal
hosts (a redirected repodata file is served as it is). A host the channel's metadata names (a
CEP-15 base_url, a CEP-16 shards_base_url) is another origin like any redirect target.
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


# IPv6 prefixes that carry an IPv4 address in their last 32 bits: NAT64's well-known prefix
# (RFC 6052) and the deprecated IPv4-compatible form (RFC 4291 2.5.5.1, which also covers
# :: and ::1). A NAT64 gateway or a dual stack delivers them to that IPv4 address.
_LAST_32_BITS = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::/96"))
# RFC 8215 local-use NAT64: the IPv4 address sits where the operator chose, and it is local anyway.
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def _reached(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to (mapped, 6to4, NAT64, compatible); else None."""
    if not isinstance(addr, ipaddress.IPv6Address):
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if any(addr in net for net in _LAST_32_BITS):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def is_public(host: str) -> bool:
    """Whether an IP address is globally routable (not loopback, private, link-local, ...).

    IPv6 forms of an IPv4 address are judged by the IPv4 address they reach: 64:ff9b::a9fe:a9fe
    is 169.254.169.254 behind any NAT64 gateway, however global its prefix looks.
    """
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host.split("%", 1)[0])
    if addr in _LOCAL_NAT64:
        return False
    addr = _reached(addr) or addr
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
    """Resolves host names to their public addresses only; for origins not configured.

    The connector connects to exactly the addresses returned here, so a name that answers a
    public address to one look-up and a private one to the next (DNS rebinding) gains nothing.
    """

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner: AbstractResolver = inner or DefaultResolver()

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
