"""cache.unit: what a unit keeps besides its bytes."""

from __future__ import annotations

import pytest

from condaproxy.cache.unit import kept_headers
from condaproxy.conda.paths import Kind

UPSTREAM = {
    "Content-Type": "text/html",
    "Content-Encoding": "gzip",
    "Content-Disposition": "attachment; filename=evil.html",
    "ETag": '"abc"',
    "Last-Modified": "Tue, 01 Dec 2026 00:00:00 GMT",
    "X-Anything": "1",
}


@pytest.mark.parametrize("kind", [Kind.PACKAGE, Kind.SHARD])
def test_packages_and_shards_keep_a_fixed_safe_header_set(kind: Kind) -> None:
    assert kept_headers(kind, UPSTREAM) == {
        "Content-Type": "application/octet-stream",
        "ETag": '"abc"',
        "Last-Modified": "Tue, 01 Dec 2026 00:00:00 GMT",
    }
    assert kept_headers(kind, {}) == {"Content-Type": "application/octet-stream"}


@pytest.mark.parametrize("kind", [Kind.REPODATA, Kind.SHARD_INDEX, Kind.OTHER])
def test_mutable_units_keep_the_upstreams_headers(kind: Kind) -> None:
    assert kept_headers(kind, UPSTREAM) == UPSTREAM
