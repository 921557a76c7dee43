"""Who the client is, and which URL it used, when a trusted front proxy stands in between.

`X-Forwarded-For` / `Forwarded` (RFC 7239) are believed only from a peer listed in [lazy]
trusted_proxies: anybody else can write them. The client is the right-most address of the chain
that is not itself a trusted proxy (each proxy appends the peer it saw).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from multidict import MultiMapping

from condaproxy.config.model import IPNetwork

# A host (and port) we are willing to print into a configuration file: no quotes, spaces, slashes.
_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_PAIR = re.compile(r'\s*([A-Za-z]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)\s*')


def _address(value: str) -> str | None:
    """An IP address from a Forwarded node or X-Forwarded-For item (ports and brackets dropped)."""
    value = value.strip().strip('"')
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]  # IPv4 with a port
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def _trusted(address: str | None, trusted: Iterable[IPNetwork]) -> bool:
    if address is None:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 on a dual-stack socket
        ip = ip.ipv4_mapped
    return any(ip in net for net in trusted)


def forwarded_elements(headers: MultiMapping[str]) -> list[dict[str, str]]:
    """The Forwarded header's elements (lower-case parameter names), left to right."""
    elements = []
    for header in headers.getall("Forwarded", []):
        for element in header.split(","):
            pairs = {}
            for match in _PAIR.finditer(element):
                value = match[2]
                if value.startswith('"'):
                    value = re.sub(r"\\(.)", r"\1", value[1:-1])
                pairs[match[1].lower()] = value
            if pairs:
                elements.append(pairs)
    return elements


def _chain(headers: MultiMapping[str]) -> list[str]:
    """The forwarded-for chain, left (original client) to right (last proxy's peer)."""
    elements = forwarded_elements(headers)
    if elements:
        return [e.get("for", "") for e in elements]
    joined = ",".join(headers.getall("X-Forwarded-For", []))
    return [item for item in (i.strip() for i in joined.split(",")) if item]


def client_address(
    remote: str | None, headers: MultiMapping[str], trusted: tuple[IPNetwork, ...]
) -> str | None:
    """The client's address: the peer's, or from the forwarding headers of a trusted peer."""
    if not trusted or not _trusted(remote, trusted):
        return remote
    client = remote
    for item in reversed(_chain(headers)):
        address = _address(item)
        if address is None:
            break  # "unknown", an obfuscated node or garbage: the hop after it is all we know
        client = address
        if not _trusted(address, trusted):
            break
    return client


def public_base(
    scheme: str,
    host: str | None,
    remote: str | None,
    headers: MultiMapping[str],
    trusted: tuple[IPNetwork, ...],
) -> str | None:
    """scheme://host the client used, believing X-Forwarded-Proto/-Host or Forwarded from a trusted peer."""
    if _trusted(remote, trusted):
        first = forwarded_elements(headers)[:1]
        proto = first[0].get("proto") if first else headers.get("X-Forwarded-Proto")
        fwd_host = first[0].get("host") if first else headers.get("X-Forwarded-Host")
        scheme = (proto or scheme).split(",")[0].strip().lower()
        host = (fwd_host or host or "").split(",")[0].strip()
    if scheme not in ("http", "https") or not host or not _HOST.fullmatch(host):
        return None
    return f"{scheme}://{host}"
