"""The proxy's own errors are RFC 9457 problem+json (conda prints `detail`); text/plain on request."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pytest
from proxy import Proxy
from upstream import FakeUpstream

from condaproxy.http.problem import prefers_text

CH = "testchan"


def _problem(body: bytes) -> dict[str, object]:
    doc = json.loads(body)
    assert isinstance(doc, dict)
    for member in ("type", "title", "status", "detail"):
        assert member in doc, doc
    return doc


async def test_unknown_path_is_problem_json(proxy: Proxy) -> None:
    resp = await proxy.get("/testchan/noarch/shards/nothex.msgpack.zst")
    assert resp.status == 404
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert resp.xcache == "MISS"
    doc = _problem(resp.body)
    assert doc["status"] == 404


async def test_upstream_failure_names_the_upstream_and_the_file(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    upstream.status(f"{CH}/noarch/repodata.json", 503)
    resp = await proxy.get(f"/{CH}/noarch/repodata.json")
    assert resp.status == 502
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    doc = _problem(resp.body)
    assert doc["status"] == 502
    assert doc["channel"] == CH and doc["file"] == "noarch/repodata.json"
    assert doc["type"] == "urn:condaproxy:problem:upstream-unavailable"
    detail = str(doc["detail"])
    assert "127.0.0.1" in detail and "noarch/repodata.json" in detail and "retry" in detail
    assert "\n" not in detail


async def test_stale_too_old_is_said(
    proxy_factory: Callable[..., Awaitable[Proxy]], upstream: FakeUpstream
) -> None:
    proxy = await proxy_factory(repodata_ttl=0, max_stale=0)
    assert (await proxy.get(f"/{CH}/noarch/repodata.json")).status == 200
    await proxy.idle()
    upstream.status(f"{CH}/noarch/repodata.json", 500)
    resp = await proxy.get(f"/{CH}/noarch/repodata.json")
    assert resp.status == 502
    assert "older than max_stale" in str(_problem(resp.body)["detail"])


async def test_upstream_404_stays_404_with_problem(proxy: Proxy) -> None:
    resp = await proxy.get(f"/{CH}/noarch/nothere-1.0-0.conda")
    assert resp.status == 404
    doc = _problem(resp.body)
    assert "does not exist" in str(doc["detail"])


async def test_text_plain_client_gets_one_line(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.status(f"{CH}/noarch/repodata.json", 503)
    resp = await proxy.get(f"/{CH}/noarch/repodata.json", headers={"Accept": "text/plain"})
    assert resp.status == 502
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert resp.body.count(b"\n") == 1 and b"noarch/repodata.json" in resp.body
    assert resp.xcache == "MISS"


async def test_unknown_channel_and_busy_keep_headers(proxy: Proxy) -> None:
    resp = await proxy.get("/t/tok/../x")
    assert resp.status in (400, 404)
    _problem(resp.body)


@pytest.mark.parametrize(
    ("accept", "text"),
    [
        ("", False),
        ("*/*", False),
        ("text/plain", True),
        ("application/json, text/plain;q=0.5", False),
        ("text/plain, */*;q=0.1", True),
        ("application/problem+json;q=0.9, text/plain", True),
        ("text/plain;q=0", False),
    ],
)
def test_prefers_text(accept: str, text: bool) -> None:
    assert prefers_text(accept) is text
