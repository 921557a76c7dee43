"""The proxy with its blobs in S3 (a real endpoint, moto_server), through faults: persist and hits,
S3 down at persist and at read, the local cache, presigned redirects, adoption between nodes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from channel import Channel
from proxy import Proxy
from s3 import AWS_ENV, MotoServer, S3FaultProxy, object_bytes, object_keys, s3_config, s3_store_config
from test_rattler_client import solve_and_install
from upstream import FakeUpstream

from condaproxy.cache.unit import Unit
from condaproxy.conda.paths import parse_path

MiB = 1 << 20
Factory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def s3proxy(upstream: FakeUpstream, tmp_path: Path, aws_env: dict[str, str]) -> AsyncIterator[Factory]:
    """Start in-process proxies storing in S3: ``await s3proxy(endpoint, bucket, **store_keys)``."""
    started: list[Proxy] = []

    async def start(
        endpoint: str, bucket: str, *, cache: dict[str, Any] | None = None, **store: Any
    ) -> Proxy:
        config = s3_config(
            tmp_path / f"node{len(started)}",
            upstream.url,
            s3_store_config(endpoint, bucket, **store),
            **(cache or {}),
        )
        proxy = Proxy(config)
        started.append(proxy)
        return await proxy.start()

    try:
        yield start
    finally:
        for proxy in reversed(started):
            await proxy.close()


def key_of(path: str):
    parsed = parse_path(path)
    return parsed.key  # type: ignore[union-attr]


async def row(proxy: Proxy, path: str) -> Unit | None:
    return await proxy.services.catalog.get(key_of(path))


async def metric(proxy: Proxy, name: str) -> float:
    """The value of an unlabelled metric (0 if absent)."""
    assert proxy.session is not None
    async with proxy.session.get(proxy.url + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.05)


def pkg_path(channel: Channel, name: str) -> tuple[str, bytes, str]:
    pkg = channel.by_name(name)
    return f"/testchan/{pkg.url_path}", pkg.read_bytes(), pkg.sha256


async def test_persist_and_hit_through_s3(
    s3proxy: Factory,
    s3faults: S3FaultProxy,
    moto: MotoServer,
    bucket: str,
    upstream: FakeUpstream,
    channel: Channel,
) -> None:
    proxy = await s3proxy(s3faults.url, bucket, prefix="cp/", part_size=5 * MiB)
    path, data, sha = pkg_path(channel, "cp-big")  # larger than a part: a multipart upload
    first = await proxy.get(path)
    assert (first.status, first.xcache, first.body) == (200, "MISS", data)
    await proxy.idle()
    unit = await row(proxy, path)
    assert unit is not None and unit.blob_key == sha and unit.size == len(data)
    # The sha256 round trip: the object is named by the sha256 of its bytes, and holds them.
    assert f"cp/blobs/{sha[:2]}/{sha}" in await object_keys(moto.url, bucket)
    assert (
        hashlib.sha256(await object_bytes(moto.url, bucket, f"cp/blobs/{sha[:2]}/{sha}")).hexdigest() == sha
    )
    assert s3faults.count("CreateMultipartUpload") == 1 and s3faults.count("UploadPart") == 2
    s3faults.seen.clear()
    hit = await proxy.get(path)
    assert (hit.status, hit.xcache, hit.body) == (200, "HIT", data)
    ranged = await proxy.get(path, headers={"Range": "bytes=100-1099"})
    assert (ranged.status, ranged.body) == (206, data[100:1100])
    assert [s.headers.get("Range") for s in s3faults.seen if s.op == "GetObject"] == [
        f"bytes=0-{len(data) - 1}",
        "bytes=100-1099",
    ]
    s3faults.seen.clear()
    head = await proxy.get(path, method="HEAD")
    assert (head.status, head.headers["Content-Length"]) == (200, str(len(data)))
    assert s3faults.count() == 0  # HEAD is answered from the catalog
    assert upstream.count(path) == 1


async def test_s3_down_at_persist_then_back(
    s3proxy: Factory,
    s3faults: S3FaultProxy,
    moto: MotoServer,
    bucket: str,
    upstream: FakeUpstream,
    channel: Channel,
) -> None:
    proxy = await s3proxy(s3faults.url, bucket)
    path, data, sha = pkg_path(channel, "cp-tools")
    # The subdir's metadata is cached (a package is stored only once its digest is known).
    await proxy.get("/testchan/linux-64/repodata.json")
    await proxy.idle()
    await s3faults.down()
    got = await proxy.get(path)
    assert (got.status, got.body) == (200, data)  # S3 down never costs a client a download
    await proxy.idle()
    assert await row(proxy, path) is None  # not complete before the blob landed
    assert await metric(proxy, "condaproxy_persist_backlog_depth") == 1
    assert await metric(proxy, "condaproxy_persist_failures_total") >= 1
    again = await proxy.get(path)  # still served, from upstream
    assert (again.status, again.body) == (200, data)
    await proxy.idle()
    await s3faults.up()

    async def landed() -> bool:
        return await row(proxy, path) is not None and not len(proxy.services.persist.backlog or ())

    await eventually(landed)
    assert f"blobs/{sha[:2]}/{sha}" in await object_keys(moto.url, bucket)
    assert await metric(proxy, "condaproxy_persist_backlog_depth") == 0
    assert not list((proxy.config.cache.directory / "tmp" / "backlog").iterdir())
    upstream.reset_counts()
    hit = await proxy.get(path)
    assert (hit.xcache, hit.body) == ("HIT", data)
    assert upstream.count(path) == 0


async def test_s3_down_at_read_falls_back_to_upstream(
    s3proxy: Factory, s3faults: S3FaultProxy, bucket: str, upstream: FakeUpstream, channel: Channel
) -> None:
    proxy = await s3proxy(s3faults.url, bucket, read_timeout=1.0)
    path, data, _ = pkg_path(channel, "cp-data")
    await proxy.get(path)
    await proxy.idle()
    await s3faults.down()
    got = await proxy.get(path)
    assert (got.status, got.xcache, got.body) == (200, "MISS", data)
    assert upstream.count(path) == 2
    assert await metric(proxy, "condaproxy_store_read_failures_total") >= 1
    await proxy.idle()
    await s3faults.up()
    # A stalled S3 is as good as a down one: past read_timeout, the upstream serves.
    stall = s3faults.add("stall", "GetObject", times=None)
    got = await proxy.get(path)
    stall.release.set()
    assert (got.status, got.body) == (200, data)
    assert upstream.count(path) == 3
    await proxy.idle()


async def test_s3_breaking_midway_is_resumed_or_aborted(
    s3proxy: Factory, s3faults: S3FaultProxy, bucket: str, channel: Channel
) -> None:
    proxy = await s3proxy(s3faults.url, bucket)
    path, data, _ = pkg_path(channel, "cp-data")
    await proxy.get(path)
    await proxy.idle()
    s3faults.add("truncate", "GetObject", at=100_000)  # once: resumed with a ranged GET
    hit = await proxy.get(path)
    assert (hit.status, hit.xcache, hit.body, hit.error) == (200, "HIT", data, None)
    s3faults.add("truncate", "GetObject", at=100_000, times=None)  # for good: never a short clean body
    broken = await proxy.get(path)
    assert broken.status == 200 and broken.error is not None and len(broken.body) < len(data)


async def test_local_cache_hits_cost_no_s3_request(
    s3proxy: Factory, s3faults: S3FaultProxy, bucket: str, upstream: FakeUpstream, channel: Channel
) -> None:
    a = await s3proxy(s3faults.url, bucket, local_cache=64 * MiB)
    path, data, sha = pkg_path(channel, "cp-tools")
    await a.get(path)
    await a.idle()
    s3faults.seen.clear()
    for _ in range(3):
        hit = await a.get(path)
        assert (hit.xcache, hit.body) == ("HIT", data)
    assert s3faults.count() == 0  # persisted here: the verified temp file became the local copy
    # A second node adopts it from the bucket; its first hit copies it to its own disk.
    b = await s3proxy(s3faults.url, bucket, local_cache=64 * MiB)
    await b.get("/testchan/linux-64/repodata.json")
    upstream.reset_counts()
    first = await b.get(path)
    assert (first.status, first.body) == (200, data)
    local = b.config.cache.directory / "s3-cache" / sha[:2] / sha

    async def copied() -> bool:
        return b.services.store.local_path(sha) is not None

    await eventually(copied)
    assert local.read_bytes() == data
    s3faults.seen.clear()
    hit = await b.get(path)
    assert (hit.xcache, hit.body) == ("HIT", data)
    assert s3faults.count() == 0
    assert upstream.count(path) == 0


async def test_adoption_between_two_nodes(
    s3proxy: Factory, s3faults: S3FaultProxy, bucket: str, upstream: FakeUpstream, channel: Channel
) -> None:
    a = await s3proxy(s3faults.url, bucket)
    b = await s3proxy(s3faults.url, bucket)
    path, data, _ = pkg_path(channel, "cp-data")
    await a.get(path)
    await a.idle()
    # B learns the package's sha256 from its own repodata (repodata stays per node).
    assert (await b.get("/testchan/linux-64/repodata.json")).status == 200
    await b.idle()
    upstream.reset_counts()
    got = await b.get(path)
    assert (got.status, got.xcache, got.body) == (200, "HIT", data)
    assert upstream.requests == []
    assert await row(b, path) is not None
    # A shard names its own sha256: adopted without any metadata.
    shard = next(p.name for p in (channel.path / "linux-64" / "shards").iterdir())
    shard_path = f"/testchan/linux-64/shards/{shard}"
    await a.get(shard_path)
    await a.idle()
    upstream.reset_counts()
    got = await b.get(shard_path)
    assert (got.status, got.xcache) == (200, "HIT")
    assert upstream.requests == []


async def test_redirect_to_presigned_urls(
    s3proxy: Factory,
    s3faults: S3FaultProxy,
    bucket: str,
    upstream: FakeUpstream,
    channel: Channel,
    tmp_path: Path,
) -> None:
    proxy = await s3proxy(s3faults.url, bucket, redirect=True, presign_ttl=120)
    path, data, _ = pkg_path(channel, "cp-data")
    first = await proxy.get(path)
    assert (first.status, first.body) == (200, data)  # a miss streams from upstream
    await proxy.idle()
    assert proxy.session is not None
    async with proxy.session.get(proxy.url + path, allow_redirects=False) as resp:
        assert resp.status == 302
        location = resp.headers["Location"]
        assert location.startswith(s3faults.url) and "X-Amz-Signature=" in location
        assert resp.headers["Cache-Control"] == "no-store"
    async with aiohttp.ClientSession() as session, session.get(location) as resp:
        assert await resp.read() == data
    head = await proxy.get(path, method="HEAD")  # presigned URLs are bound to GET: answered here
    assert (head.status, head.headers["Content-Length"]) == (200, str(len(data)))
    repodata = await proxy.get("/testchan/noarch/repodata.json")
    assert repodata.status == 200 and repodata.body  # repodata is always served by the proxy
    await proxy.idle()
    again = await proxy.get("/testchan/noarch/repodata.json")
    assert (again.status, again.xcache) == (200, "HIT")
    # A real client installs through the proxy, following redirects to the bucket.
    names = await solve_and_install(
        f"{proxy.url}/testchan", tmp_path / "env", tmp_path / "client", sharded=True
    )
    assert any(n.startswith("cp-extra-") for n in names)
    await proxy.idle()
    upstream.reset_counts()
    names2 = await solve_and_install(
        f"{proxy.url}/testchan", tmp_path / "env2", tmp_path / "client2", sharded=True
    )
    assert names2 == names
    assert not [r for r in upstream.requests if r.path.endswith(".conda")]
    assert await metric(proxy, "condaproxy_store_redirects_total") >= len(names)


async def test_missing_bucket_keeps_serving_from_upstream(
    s3proxy: Factory, moto: MotoServer, upstream: FakeUpstream, channel: Channel
) -> None:
    proxy = await s3proxy(moto.url, "no-such-bucket-at-all")
    path, data, _ = pkg_path(channel, "cp-data")
    for _ in range(2):
        got = await proxy.get(path)
        assert (got.status, got.body) == (200, data)
        await proxy.idle()
    assert await row(proxy, path) is None
    assert await metric(proxy, "condaproxy_persist_failures_total") >= 2
    assert upstream.count(path) == 2


async def test_bad_credentials_keep_serving_from_upstream(
    s3proxy: Factory, moto_with_auth: MotoServer, upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    proxy = await s3proxy(moto_with_auth.url, "any-bucket")
    path, data, _ = pkg_path(channel, "cp-data")
    for _ in range(2):
        got = await proxy.get(path)
        assert (got.status, got.body) == (200, data)
        await proxy.idle()
    assert await metric(proxy, "condaproxy_persist_failures_total") >= 2
    assert upstream.count(path) == 2
    refused = check_config(tmp_path, moto_with_auth.url, "any-bucket", {**os.environ, **AWS_ENV})
    assert refused.returncode == 1 and "access denied" in refused.stderr


async def test_backlog_is_bounded(
    s3proxy: Factory, s3faults: S3FaultProxy, bucket: str, channel: Channel
) -> None:
    proxy = await s3proxy(s3faults.url, bucket, persist_backlog=1)
    await proxy.get("/testchan/linux-64/repodata.json")
    await proxy.idle()
    await s3faults.down()
    for name in ("cp-data", "cp-tools"):
        path, data, _ = pkg_path(channel, name)
        got = await proxy.get(path)
        assert (got.status, got.body) == (200, data)
        await proxy.idle()
    assert await metric(proxy, "condaproxy_persist_backlog_depth") == 1
    assert await metric(proxy, "condaproxy_persist_dropped_total") == 1


def check_config(
    tmp_path: Path, endpoint: str, bucket: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    ini = tmp_path / f"{bucket}.ini"
    ini.write_text(
        f"[store]\nbackend = s3\nbucket = {bucket}\nendpoint_url = {endpoint}\naddressing_style = path\n"
        "connect_timeout = 1\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "condaproxy", "check-config", "--online", str(ini)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_check_config_online(moto: MotoServer, tmp_path: Path) -> None:
    env = {**os.environ, **AWS_ENV}
    asyncio.run(_make_bucket(moto.url, "checked"))
    ok = check_config(tmp_path, moto.url, "checked", env)
    assert ok.returncode == 0, ok.stderr
    assert "reachable and writable" in ok.stdout
    missing = check_config(tmp_path, moto.url, "not-there", env)
    assert missing.returncode == 1
    assert "no such bucket" in missing.stderr
    closed = f"http://127.0.0.1:{_closed_port()}"
    unreachable = check_config(tmp_path, closed, "checked", env)
    assert unreachable.returncode == 1 and "endpoint unreachable" in unreachable.stderr
    empty = tmp_path / "empty"
    empty.write_text("")
    bare = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    bare.update(
        AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=str(empty), AWS_CONFIG_FILE=str(empty)
    )
    anonymous = check_config(tmp_path, moto.url, "checked", bare)
    assert anonymous.returncode == 1 and "no credentials" in anonymous.stderr
    for result in (ok, missing, unreachable, anonymous):
        assert AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr.replace("testchan", "")


async def _make_bucket(endpoint: str, name: str) -> None:
    from s3 import create_bucket

    await create_bucket(endpoint, name)


def _closed_port() -> int:
    from proxy import free_port

    return free_port()
