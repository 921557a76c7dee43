"""Who the client is behind a front: X-Forwarded-For and Forwarded believed from trusted peers only."""

from __future__ import annotations

import ipaddress

from multidict import CIMultiDict

from condaproxy.http.forwarded import client_address, public_base

TRUSTED = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))


def h(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


def test_untrusted_peer_is_the_client_whatever_it_claims() -> None:
    assert client_address("192.0.2.7", h(("X-Forwarded-For", "203.0.113.1")), TRUSTED) == "192.0.2.7"
    assert client_address("127.0.0.1", h(("X-Forwarded-For", "203.0.113.1")), ()) == "127.0.0.1"


def test_rightmost_untrusted_address_wins() -> None:
    # The client forged the first entry; the trusted chain appended the real one.
    xff = h(("X-Forwarded-For", "6.6.6.6, 198.51.100.4, 10.1.2.3"))
    assert client_address("127.0.0.1", xff, TRUSTED) == "198.51.100.4"
    two = h(("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "198.51.100.4"))
    assert client_address("127.0.0.1", two, TRUSTED) == "198.51.100.4"
    assert client_address("::ffff:127.0.0.1", xff, TRUSTED) == "198.51.100.4"


def test_forwarded_header_wins_over_x_forwarded_for() -> None:
    fwd = h(
        ("Forwarded", 'for=6.6.6.6, for="[2001:db8::1]:4711";proto=https'), ("X-Forwarded-For", "1.1.1.1")
    )
    assert client_address("127.0.0.1", fwd, TRUSTED) == "2001:db8::1"
    assert client_address("127.0.0.1", h(("Forwarded", "for=192.0.2.60:8080")), TRUSTED) == "192.0.2.60"


def test_garbage_in_the_chain_stops_at_the_last_known_hop() -> None:
    bad = h(("X-Forwarded-For", "198.51.100.4, <script>, 10.0.0.9"))
    assert client_address("127.0.0.1", bad, TRUSTED) == "10.0.0.9"
    assert client_address("127.0.0.1", h(("Forwarded", "for=unknown")), TRUSTED) == "127.0.0.1"


def test_public_base_from_trusted_fronts_only() -> None:
    fwd = h(("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "conda.example.org"))
    assert public_base("http", "127.0.0.1:8751", "127.0.0.1", fwd, TRUSTED) == "https://conda.example.org"
    assert public_base("http", "127.0.0.1:8751", "192.0.2.7", fwd, TRUSTED) == "http://127.0.0.1:8751"
    rfc = h(("Forwarded", 'proto=https;host="conda.example.org:8443"'))
    assert public_base("http", "x", "127.0.0.1", rfc, TRUSTED) == "https://conda.example.org:8443"
    assert public_base("http", 'evil"host', "192.0.2.7", h(), TRUSTED) is None
    assert public_base("gopher", "host", "127.0.0.1", h(("X-Forwarded-Proto", "gopher")), TRUSTED) is None
