"""Private channels: cached bytes only for tokens the upstream accepts; public ones share a cache."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
from channel import Channel
from proxy import Proxy, check_invariants, make_config
from test_rattler_client import solve_and_install
from upstream import FakeUpstream

TOKEN = "pv-0123456789abcdef-SECRET"


@pytest.fixture
async def private(upstream: FakeUpstream, channel: Channel, tmp_path: Path):
    """A proxy whose channel "private" exists upstream only under /t/<TOKEN>/private."""
    upstream.mount(f"t/{TOKEN}/private", channel.path)
    config = make_config(tmp_path / "cache", upstream.url, repodata_ttl=60)
    chan = replace(
        config.channel("private"),  # type: ignore[type-var]
        url=f"{upstream.url}/private",
        urls=(f"{upstream.url}/private",),
        private=True,
    )
    config = replace(config, channels={"private": chan})
    proxy = await Proxy(config).start()
    yield proxy
    await proxy.close()


async def test_token_accepted_upstream_gets_bytes_others_never(
    private: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    pkg = channel.by_name("cp-app")
    good = await private.get(f"/t/{TOKEN}/private/{pkg.url_path}")
    assert good.status == 200 and good.body == pkg.read_bytes()
    await private.idle()
    hit = await private.get(f"/t/{TOKEN}/private/{pkg.url_path}")
    assert hit.xcache == "HIT" and hit.body == pkg.read_bytes()
    # The package is cached now; still nobody else gets it.
    anonymous = await private.get(f"/private/{pkg.url_path}")
    assert anonymous.status == 401 and pkg.read_bytes()[:64] not in anonymous.body
    wrong = await private.get(f"/t/not-the-token/private/{pkg.url_path}")
    assert wrong.status == 403 and pkg.read_bytes()[:64] not in wrong.body
    for resp in (anonymous, wrong):
        assert len(json.loads(resp.body)["detail"]) < 200  # a one-line reason, nothing more


async def test_acceptance_is_remembered_not_asked_per_request(
    private: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    for pkg in channel.packages.values():
        assert (await private.get(f"/t/{TOKEN}/private/{pkg.url_path}")).status == 200
    probes = upstream.count(f"/t/{TOKEN}/private/noarch/repodata.json")
    assert 1 <= probes <= 2  # the one check, plus at most the digest look-up's own fetch


async def test_refused_tokens_are_remembered_too(private: Proxy, upstream: FakeUpstream) -> None:
    for _ in range(3):
        assert (await private.get("/t/bad-token/private/noarch/repodata.json")).status == 403
    assert upstream.count("/t/bad-token/private/noarch/repodata.json") == 1


async def test_upstream_down_during_check_is_502_and_not_remembered(
    private: Proxy, upstream: FakeUpstream
) -> None:
    path = f"/t/{TOKEN}/private/noarch/repodata.json"
    upstream.status(path, 503, times=1)
    assert (await private.get(path)).status == 502
    assert (await private.get(path)).status == 200


async def test_install_from_private_channel_with_token(
    private: Proxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    names = await solve_and_install(
        f"{private.url}/t/{TOKEN}/private", tmp_path / "env", tmp_path / "client", sharded=True
    )
    assert any(n.startswith("cp-extra-") for n in names)
    await private.idle()
    check_invariants(private.config.cache.directory)
    assert TOKEN not in caplog.text
    for path in private.config.cache.directory.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


async def test_public_channel_ignores_client_tokens_and_shares_one_cache(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    pkg = channel.by_name("cp-tools")
    first = await proxy.get(f"/t/someones-token/testchan/{pkg.url_path}")
    assert first.status == 200 and first.body == pkg.read_bytes()
    await proxy.idle()
    for path in (f"/testchan/{pkg.url_path}", f"/t/another-token/testchan/{pkg.url_path}"):
        again = await proxy.get(path)
        assert again.xcache == "HIT" and again.body == pkg.read_bytes()
    assert all("/t/" not in r.path for r in upstream.requests)
