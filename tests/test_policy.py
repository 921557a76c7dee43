"""Release cooldown and allow/deny rules, shown with a real client (py-rattler) through the proxy.

The upstream publishes alpha 1.2 today next to alpha 1.1 from last month. With min_age = 7d a
solve picks 1.1 whichever index form the client reads (shards, .zst, .json), and a GET of the
1.2 file is refused with 403 problem+json; moved past the cooldown (the clock, not a sleep), 1.2
appears. A hide rule and a deny rule are shown the same way.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import rattler
from proxy import Proxy, check_invariants, make_config
from timed_channel import Clock, Pkg, publish
from upstream import FakeUpstream

from condaproxy.conda.rules import parse_rule
from condaproxy.config.model import Config

DAY = 86400.0
# "no-cache": each solve asks the proxy again.
FORMS = {
    "shards": rattler.SourceConfig(sharded_enabled=True, cache_action="no-cache"),
    "zst": rattler.SourceConfig(
        sharded_enabled=False, zstd_enabled=True, bz2_enabled=False, cache_action="no-cache"
    ),
    "json": rattler.SourceConfig(
        sharded_enabled=False, zstd_enabled=False, bz2_enabled=False, cache_action="no-cache"
    ),
}


async def solve(url: str, cache: Path, form: str, spec: str = "alpha") -> dict[str, str]:
    """name -> version of a solve through url (http://proxy[/@when]/channel) reading one index form."""
    gateway = rattler.Gateway(cache_dir=cache, default_config=FORMS[form])
    records = await rattler.solve(sources=[url], specs=[spec], gateway=gateway, platforms=["noarch"])
    return {r.name.normalized: str(r.version) for r in records}


@pytest.fixture
def now() -> float:
    return time.time()


@pytest.fixture
def alpha(tmp_path: Path, upstream: FakeUpstream, now: float) -> Path:
    root = tmp_path / "alpha"
    publish(root, [Pkg("alpha", "1.1", now - 30 * DAY), Pkg("alpha", "1.2", now - 3600)])
    upstream.mount("alpha", root)
    return root


def config(
    tmp_path: Path, upstream: FakeUpstream, *rules: tuple[str, str, str], **cooldown: object
) -> Config:
    base = make_config(tmp_path / "cache", upstream.url, repodata_ttl=0)
    return dataclasses.replace(
        base,
        upstream=dataclasses.replace(base.upstream, **cooldown),
        rules=tuple(parse_rule(name, action, spec) for name, action, spec in rules),
    )


async def started(cfg: Config, clock: Clock) -> Proxy:
    return await Proxy(cfg, clock=clock).start()


@pytest.mark.parametrize("form", ["shards", "zst", "json"])
async def test_cooldown_holds_a_fresh_release_in_every_form(
    tmp_path: Path, upstream: FakeUpstream, alpha: Path, now: float, form: str
) -> None:
    clock = Clock(now)
    proxy = await started(config(tmp_path, upstream, min_age=7 * DAY), clock)
    try:
        url = f"{proxy.url}/alpha"
        assert (await solve(url, tmp_path / "c1", form))["alpha"] == "1.1"
        answer = await proxy.get("/alpha/noarch/alpha-1.2-0.conda")
        assert answer.status == 403
        assert answer.headers["Content-Type"].startswith("application/problem+json")
        body = json.loads(answer.body)
        assert body["status"] == 403 and body["rule"] == "min_age" and "available_at" in body
        assert "cooldown" in body["detail"] and body["file"] == "noarch/alpha-1.2-0.conda"
        assert (await proxy.get("/alpha/noarch/alpha-1.1-0.conda")).status == 200
        metrics = (await proxy.get("/metrics")).body.decode()
        assert 'condaproxy_policy_held{channel="alpha"} 1.0' in metrics
        assert 'condaproxy_policy_refused_total{channel="alpha",reason="min_age"} 1.0' in metrics
        plain = await proxy.get("/alpha/noarch/alpha-1.2-0.conda", headers={"Accept": "text/plain"})
        assert plain.status == 403 and plain.headers["Content-Type"].startswith("text/plain")
        assert plain.body.decode() == body["detail"] + "\n" and plain.xcache == "MISS"

        await proxy.idle()
        clock.advance(7 * DAY)  # 1.2 is now older than min_age
        assert (await solve(url, tmp_path / "c2", form))["alpha"] == "1.2"
        assert (await proxy.get("/alpha/noarch/alpha-1.2-0.conda")).status == 200
        await proxy.idle()
    finally:
        await proxy.close()
    check_invariants(tmp_path / "cache")


async def test_every_index_form_leaves_the_young_record_out(
    tmp_path: Path, upstream: FakeUpstream, alpha: Path, now: float
) -> None:
    proxy = await started(config(tmp_path, upstream, min_age=7 * DAY), Clock(now))
    try:
        for name in ("repodata.json", "repodata.json.zst", "repodata.json.bz2", "current_repodata.json"):
            answer = await proxy.get(f"/alpha/noarch/{name}")
            assert answer.status == 200, name
            assert b"alpha-1.1-0.conda" in _decoded(name, answer.body), name
            assert b"alpha-1.2-0.conda" not in _decoded(name, answer.body), name
            limit = int(answer.headers["Cache-Control"].rpartition("=")[2])
            assert limit <= 60  # never past the TTL, nor past the next coming of age
    finally:
        await proxy.close()


def _decoded(name: str, body: bytes) -> bytes:
    import bz2

    import zstandard

    if name.endswith(".zst"):
        return zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 24)
    if name.endswith(".bz2"):
        return bz2.decompress(body)
    return body


async def test_exempt_packages_skip_the_cooldown(
    tmp_path: Path, upstream: FakeUpstream, alpha: Path, now: float
) -> None:
    proxy = await started(config(tmp_path, upstream, min_age=7 * DAY, min_age_exempt=("alph*",)), Clock(now))
    try:
        assert (await solve(f"{proxy.url}/alpha", tmp_path / "c", "zst"))["alpha"] == "1.2"
    finally:
        await proxy.close()


@pytest.mark.parametrize("form", ["shards", "json"])
async def test_hide_rule_takes_records_out_and_refuses_their_files(
    tmp_path: Path, upstream: FakeUpstream, alpha: Path, now: float, form: str
) -> None:
    proxy = await started(config(tmp_path, upstream, ("no-1.2", "hide", "alpha 1.2")), Clock(now))
    try:
        assert (await solve(f"{proxy.url}/alpha", tmp_path / "c", form))["alpha"] == "1.1"
        answer = await proxy.get("/alpha/noarch/alpha-1.2-0.conda")
        assert answer.status == 403 and json.loads(answer.body)["rule"] == "no-1.2"
        metrics = (await proxy.get("/metrics")).body.decode()
        assert 'condaproxy_policy_hidden{channel="alpha",rule="no-1.2"} 1.0' in metrics
    finally:
        await proxy.close()


async def test_deny_rule_refuses_the_file_and_names_the_rule(
    tmp_path: Path, upstream: FakeUpstream, alpha: Path, now: float
) -> None:
    proxy = await started(config(tmp_path, upstream, ("old-alpha", "deny", "alpha <1.2")), Clock(now))
    try:
        url = f"{proxy.url}/alpha"
        # The index is left alone: a client that picks a denied record hears which rule said no.
        records = await rattler.solve(
            sources=[url],
            specs=["alpha <1.2"],
            platforms=["noarch"],
            gateway=rattler.Gateway(cache_dir=tmp_path / "c", default_config=FORMS["json"]),
        )
        assert [str(r.version) for r in records] == ["1.1"]
        with pytest.raises(Exception, match=r"403|old-alpha|Forbidden"):
            await rattler.install(records, target_prefix=tmp_path / "env", cache_dir=tmp_path / "pkgs")
        answer = await proxy.get("/alpha/noarch/alpha-1.1-0.conda")
        body = json.loads(answer.body)
        assert answer.status == 403 and body["rule"] == "old-alpha" and "old-alpha" in body["detail"]
        assert (await proxy.get("/alpha/noarch/alpha-1.2-0.conda")).status == 200
    finally:
        await proxy.close()


async def test_indexed_timestamp_is_served_for_clients_own_exclude_newer(
    tmp_path: Path, upstream: FakeUpstream, alpha: Path, now: float
) -> None:
    proxy = await started(config(tmp_path, upstream, indexed_timestamp=True), Clock(now))
    try:
        answer = await proxy.get("/alpha/noarch/repodata.json")
        records = json.loads(answer.body)["packages.conda"]
        assert records["alpha-1.2-0.conda"]["indexed_timestamp"] == records["alpha-1.2-0.conda"]["timestamp"]
        assert (await solve(f"{proxy.url}/alpha", tmp_path / "c", "json"))["alpha"] == "1.2"
    finally:
        await proxy.close()
