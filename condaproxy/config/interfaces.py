"""Listening addresses: IP literals as given, network interface names resolved (psutil)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from pathlib import Path

import psutil  # psutil ships no type information

from condaproxy.errors import ConfigError


def bind_addresses(interfaces: Sequence[str], *, source: Path | str | None = None) -> list[str]:
    """The IP addresses to listen on: IP literals as given, interface names resolved."""
    file = str(source) if source is not None else "<config>"

    def error(message: str) -> ConfigError:
        return ConfigError(file, "lazy", "streamer_interface", message)

    if not interfaces:
        raise error("expected at least one interface name or IP address")
    table: dict[str, list[str]] | None = None
    addresses: dict[str, None] = {}  # ordered set
    for item in interfaces:
        try:
            found = [str(ipaddress.ip_address(item))]
        except ValueError:
            table = _interface_addresses() if table is None else table
            if item not in table:
                known = ", ".join(sorted(table))
                message = f"{item!r} is neither an IP address nor a network interface here"
                raise error(f"{message} (interfaces: {known})") from None
            found = table[item]
            if not found:
                raise error(f"interface {item!r} has no IPv4 or IPv6 address") from None
        addresses.update(dict.fromkeys(found))
    return list(addresses)


def _interface_addresses() -> dict[str, list[str]]:
    """Each interface's IPv4 and IPv6 addresses, as psutil reports them now."""
    table: dict[str, list[str]] = {}
    for name, entries in psutil.net_if_addrs().items():
        table[str(name)] = [
            str(entry.address)
            for entry in entries
            # Link-local IPv6 carries a %scope and is of no use to conda clients.
            if entry.family in (socket.AF_INET, socket.AF_INET6) and "%" not in entry.address
        ]
    return table
