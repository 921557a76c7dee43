"""Channels learned to be private: refused without a token upstream, accepted with the client's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from channel import Channel
from proxy import Proxy, check_invariants, make_config
from upstream import FakeUpstream

from condaproxy.config.model import Config

TOKEN = "lp-0123456789abcdef-SECRET"
REPODATA = "noarch/repodata.json"


def config_for(upstream: FakeUpstream, cache: Path, **channel: object) -> Config:
    config = make_config(cache, upstream.url, repodata_ttl=60)
    chan = replace(
        config.channel("lp"),  # type: ignore[type-var]
        url=f"{upstream.url}/lp",
        urls=(f"{upstream.url}/lp",),
        **channel,
    )
    return replace(config, channels={"lp": chan})


@pytest.fixture
def refusing(upstream: FakeUpstream, channel: Channel) -> FakeUpstream:
    """Channel "lp" is served upstream only under /t/<TOKEN>/lp; without the token, 401."""
    upstream.mount(f"t/{TOKEN}/lp", channel.path)
    pkg = channel.by_name("cp-app")
    for path in (REPODATA, pkg.url_path):
        upstream.status(f"lp/{path}", 401)
    return upstream


@pytest.fixture
async def learner(refusing: FakeUpstream, tmp_path: Path) -> AsyncIterator[Proxy]:
    proxy = await Proxy(config_for(refusing, tmp_path / "cache")).start()
    yield proxy
    await proxy.close()


async def test_learned_private_then_only_accepted_tokens(
    learner: Proxy, refusing: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    want = (channel.path / REPODATA).read_bytes()
    anonymous = await learner.get(f"/lp/{REPODATA}")
    assert anonymous.status == 401  # the upstream's refusal, passed on: nothing learned yet
    good = await learner.get(f"/t/{TOKEN}/lp/{REPODATA}")
    assert good.status == 200 and good.body == want
    await learner.idle()
    assert await learner.services.catalog.learned_private() == {"lp"}
    # Private now: cached bytes only for a token the upstream accepts.
    hit = await learner.get(f"/t/{TOKEN}/lp/{REPODATA}")
    assert hit.status == 200 and hit.xcache == "HIT" and hit.body == want
    refusing.reset_counts()
    again = await learner.get(f"/lp/{REPODATA}")
    assert again.status == 401 and want[:64] not in again.body
    assert refusing.requests == []  # refused by the proxy itself, before any cache look-up
    wrong = await learner.get(f"/t/not-the-token/lp/{REPODATA}")
    assert wrong.status == 403 and want[:64] not in wrong.body
    pkg = channel.by_name("cp-app")
    got = await learner.get(f"/t/{TOKEN}/lp/{pkg.url_path}")
    assert got.status == 200 and got.body == pkg.read_bytes()
    await learner.idle()
    check_invariants(learner.config.cache.directory)


async def test_learned_private_survives_a_restart(
    learner: Proxy, refusing: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    assert (await learner.get(f"/t/{TOKEN}/lp/{REPODATA}")).status == 200
    await learner.idle()
    await learner.close()
    proxy = await Proxy(config_for(refusing, tmp_path / "cache")).start()
    try:
        refusing.reset_counts()
        anonymous = await proxy.get(f"/lp/{REPODATA}")
        assert anonymous.status == 401 and refusing.requests == []
        hit = await proxy.get(f"/t/{TOKEN}/lp/{REPODATA}")
        assert hit.status == 200 and hit.xcache == "HIT"
    finally:
        await proxy.close()


async def test_a_token_the_upstream_refuses_teaches_nothing(learner: Proxy) -> None:
    resp = await learner.get(f"/t/not-the-token/lp/{REPODATA}")
    assert resp.status == 401
    assert await learner.services.catalog.learned_private() == set()


async def test_private_no_is_never_learned(refusing: FakeUpstream, tmp_path: Path) -> None:
    proxy = await Proxy(config_for(refusing, tmp_path / "cache", private_configured=True)).start()
    try:
        resp = await proxy.get(f"/t/{TOKEN}/lp/{REPODATA}")
        assert resp.status == 401
        assert await proxy.services.catalog.learned_private() == set()
    finally:
        await proxy.close()


async def test_public_channel_ignores_tokens_and_shares_a_cache(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    first = await proxy.get(f"/t/{TOKEN}/testchan/{REPODATA}")
    assert first.status == 200
    await proxy.idle()
    second = await proxy.get(f"/testchan/{REPODATA}")
    assert second.xcache == "HIT" and second.body == first.body
    assert all("/t/" not in r.path for r in upstream.requests)
    assert await proxy.services.catalog.learned_private() == set()
