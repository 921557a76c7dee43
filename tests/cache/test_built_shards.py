"""CEP-16 shards built by the proxy for a channel whose upstream has only repodata.json."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zstandard
from channel import Channel
from proxy import Proxy, check_invariants
from test_rattler_client import solve_and_install
from upstream import FakeUpstream

INDEX = "repodata_shards.msgpack.zst"


def unpack(data: bytes) -> Any:
    raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 26)
    return msgpack.unpackb(raw, raw=False)


@pytest.fixture
async def json_only(upstream: FakeUpstream, channel: Channel, tmp_path: Path) -> Path:
    root = channel.json_only_copy(tmp_path / "jsononly")
    upstream.mount("jsononly", root)
    return root


async def _built(proxy: Proxy, subdir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The built index, and every shard it names, fetched through the proxy."""
    resp = await proxy.get(f"/jsononly/{subdir}/{INDEX}")
    assert resp.status == 200, resp.body
    index = unpack(resp.body)
    shards = {}
    for name, digest in index["shards"].items():
        got = await proxy.get(f"/jsononly/{subdir}/shards/{digest.hex()}.msgpack.zst")
        assert got.status == 200, (name, got.body)
        shards[name] = unpack(got.body)
    return index, shards


@pytest.mark.parametrize("subdir", ["noarch", "linux-64"])
async def test_built_shards_equal_rattlers(
    proxy: Proxy, channel: Channel, json_only: Path, subdir: str
) -> None:
    # The fixture channel was indexed by rattler's index_fs with shards written: the reference.
    want_index = unpack((channel.path / subdir / INDEX).read_bytes())
    index, shards = await _built(proxy, subdir)
    for field in ("subdir", "base_url", "shards_base_url"):
        assert index["info"][field] == want_index["info"][field]
    if "version" in want_index:
        assert index["version"] == want_index["version"]
    assert set(index["shards"]) == set(want_index["shards"])
    for name, digest in want_index["shards"].items():
        want = unpack((channel.path / subdir / "shards" / f"{digest.hex()}.msgpack.zst").read_bytes())
        assert shards[name] == want, name  # records, raw-bytes sha256/md5, removed
        for record in shards[name]["packages.conda"].values():
            assert isinstance(record["sha256"], bytes) and len(record["sha256"]) == 32
            assert isinstance(record["md5"], bytes) and len(record["md5"]) == 16
    await proxy.idle()
    check_invariants(proxy.config.cache.directory)


async def test_head_mirrors_get(proxy: Proxy, json_only: Path) -> None:
    get = await proxy.get(f"/jsononly/noarch/{INDEX}")
    head = await proxy.get(f"/jsononly/noarch/{INDEX}", method="HEAD")
    assert head.status == 200 and int(head.headers["Content-Length"]) == len(get.body)
    digest = next(iter(unpack(get.body)["shards"].values())).hex()
    await proxy.idle()
    shard = await proxy.get(f"/jsononly/noarch/shards/{digest}.msgpack.zst", method="HEAD")
    assert shard.status == 200 and int(shard.headers["Content-Length"]) > 0


async def test_built_once_however_many_ask(proxy: Proxy, upstream: FakeUpstream, json_only: Path) -> None:
    answers = await asyncio.gather(*(proxy.get(f"/jsononly/noarch/{INDEX}") for _ in range(6)))
    assert {a.status for a in answers} == {200}
    assert len({a.body for a in answers}) == 1
    await proxy.idle()
    again = await proxy.get(f"/jsononly/noarch/{INDEX}")
    assert again.xcache == "HIT" and again.body == answers[0].body
    assert upstream.count(f"/jsononly/noarch/{INDEX}") == 1  # asked once, 404, built
    assert upstream.count("/jsononly/noarch/repodata.json") == 1


async def test_rebuilt_when_repodata_changes_unchanged_shards_kept(
    proxy_factory: Any, upstream: FakeUpstream, json_only: Path
) -> None:
    proxy = await proxy_factory(repodata_ttl=0)
    first = unpack((await proxy.get(f"/jsononly/noarch/{INDEX}")).body)
    await proxy.idle()
    doc = json.loads((json_only / "noarch" / "repodata.json").read_bytes())
    name, record = next(iter(doc["packages.conda"].items()))
    added = dict(record, version="9.9", build_number=9)
    doc["packages.conda"][name.replace(record["version"], "9.9")] = added
    upstream.replace("jsononly/noarch/repodata.json", json.dumps(doc).encode(), "application/json")
    second = unpack((await proxy.get(f"/jsononly/noarch/{INDEX}")).body)
    changed = record["name"]
    assert second["shards"][changed] != first["shards"][changed]
    for other, digest in first["shards"].items():
        if other != changed:
            assert second["shards"][other] == digest  # same bytes, same sha256: nothing to re-download
    await proxy.idle()
    shard = await proxy.get(f"/jsononly/noarch/shards/{second['shards'][changed].hex()}.msgpack.zst")
    assert "9.9" in {r["version"] for r in unpack(shard.body)["packages.conda"].values()}


async def test_rattler_installs_through_built_shards(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel, json_only: Path, tmp_path: Path
) -> None:
    client = tmp_path / "client"
    names = await solve_and_install(f"{proxy.url}/jsononly", tmp_path / "env", client, sharded=True)
    assert any(n.startswith("cp-extra-") for n in names)
    # The client's cache holds shards (and the index), not a whole repodata.json.
    cache = client / "repodata"
    assert list(cache.glob("*.shards-cache-v1")) and list((cache / "shards-v1").glob("*.msgpack"))
    assert not list(cache.glob("*.json")) or all(p.name.endswith(".info.json") for p in cache.glob("*.json"))
    # And the proxy served the shards: its store has them, upstream was never asked for one.
    assert not any("/shards/" in r.path for r in upstream.requests)
    await proxy.idle()
    check_invariants(proxy.config.cache.directory)
