"""The test parts themselves: the built channel and the fake upstream behave as documented."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import rattler
from aiohttp.http_exceptions import ContentLengthError, TransferEncodingError
from channel import Channel, PackageInfo
from upstream import FakeUpstream

BIG = "linux-64/cp-big-1.0-h0000000_0.conda"  # ~6 MiB
DATA = "linux-64/cp-data-1.0-h0000000_0.conda"  # ~2 MiB


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client with a timeout, so a misbehaving fault fails a test instead of hanging it."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
        yield client


def upath(key: str) -> str:
    """The fake upstream's URL path for a channel-relative path."""
    return f"/testchan/{key}"


async def read_counting(response: aiohttp.ClientResponse, got: list[int]) -> None:
    """Read the body, recording how many bytes arrived before any error."""
    async for chunk in response.content.iter_any():
        got[0] += len(chunk)


# -- the channel ---------------------------------------------------------------


def test_channel_is_complete(channel: Channel) -> None:
    for subdir in channel.subdirs:
        for name in ("repodata.json", "repodata.json.zst", "repodata_shards.msgpack.zst"):
            assert (channel.path / subdir / name).is_file()
        assert any((channel.path / subdir / "shards").glob("*.msgpack.zst"))
    assert len(channel.packages) == 8
    for key, info in channel.packages.items():
        assert key == info.url_path
        data = info.read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (info.size, info.sha256)
    assert channel.packages[BIG].size > 6 * 1024 * 1024  # incompressible payload
    assert channel.by_name("cp-lib").version == "1.1"


def test_channel_copies(channel: Channel, tmp_path: Path) -> None:
    shardless = channel.shardless_copy(tmp_path / "shardless")
    json_only = channel.json_only_copy(tmp_path / "json-only")
    for subdir in channel.subdirs:
        assert (shardless / subdir / "repodata.json.zst").is_file()
        assert not (shardless / subdir / "repodata_shards.msgpack.zst").exists()
        assert not (shardless / subdir / "shards").exists()
        assert sorted(p.name for p in (json_only / subdir).iterdir() if "repodata" in p.name) == [
            "repodata.json"
        ]
        assert not (json_only / subdir / "shards").exists()
    for info in channel.packages.values():
        assert (shardless / info.url_path).read_bytes() == info.read_bytes()
        assert (json_only / info.url_path).is_file()


# -- plain serving -------------------------------------------------------------


async def test_serves_files_byte_exact(
    upstream: FakeUpstream, channel: Channel, session: aiohttp.ClientSession
) -> None:
    for info in channel.packages.values():
        async with session.get(upstream.url + upath(info.url_path)) as response:
            assert response.status == 200
            assert response.content_length == info.size
            assert response.headers["ETag"].startswith('"')
            assert "Last-Modified" in response.headers
            body = await response.read()
        assert hashlib.sha256(body).hexdigest() == info.sha256
    async with session.get(upstream.url + upath("noarch/repodata.json")) as response:
        assert response.content_type == "application/json"
        assert json.loads(await response.read()) == json.loads(
            (channel.path / "noarch" / "repodata.json").read_bytes()
        )


async def test_head_and_404(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    async with session.head(upstream.url + upath(BIG)) as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) > 6 * 1024 * 1024
        assert await response.read() == b""
    for missing in ("noarch/nope.conda", "noarch", "other/noarch/repodata.json", "noarch/../../etc/passwd"):
        async with session.get(upstream.url + "/testchan/" + missing) as response:
            assert response.status == 404, missing
    async with session.post(upstream.url + upath(BIG)) as response:
        assert response.status == 405


async def test_counts_and_recorded_headers(
    upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    url = upstream.url + upath("noarch/repodata.json")
    waiter = asyncio.create_task(upstream.wait_for(upath("noarch/repodata.json"), 2))
    for _ in range(2):
        async with session.get(url, headers={"X-Probe": "yes"}) as response:
            await response.read()
    async with session.head(url) as response:
        pass
    await waiter
    assert upstream.count(upath("noarch/repodata.json")) == 2
    assert upstream.count("testchan/noarch/repodata.json", "HEAD") == 1  # leading slash optional
    assert upstream.count(upath("noarch/repodata.json"), None) == 3
    method, path, headers = upstream.requests[0]
    assert (method, path) == ("GET", "/testchan/noarch/repodata.json")
    assert headers["x-probe"] == "yes"  # case-insensitive
    assert "Range" not in headers and "Authorization" not in headers
    upstream.reset_counts()
    assert upstream.count(upath("noarch/repodata.json"), None) == 0
    assert upstream.requests == []


async def test_conditional_requests(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    url = upstream.url + upath("noarch/repodata.json")
    async with session.get(url) as response:
        etag = response.headers["ETag"]
        last_modified = response.headers["Last-Modified"]
    async with session.get(url, headers={"If-None-Match": etag}) as response:
        assert response.status == 304
        assert response.headers["ETag"] == etag
        assert await response.read() == b""
    async with session.get(url, headers={"If-None-Match": f'"other", W/{etag}'}) as response:
        assert response.status == 304  # weak comparison for If-None-Match
    async with session.get(url, headers={"If-Modified-Since": last_modified}) as response:
        assert response.status == 304
    async with session.get(
        url, headers={"If-None-Match": '"other"', "If-Modified-Since": last_modified}
    ) as response:
        assert response.status == 200  # If-None-Match takes precedence (RFC 9110 §13.1.3)


async def test_ranges(
    upstream: FakeUpstream, channel: Channel, session: aiohttp.ClientSession
) -> None:
    info = channel.packages[DATA]
    data = info.read_bytes()
    url = upstream.url + upath(DATA)
    cases = {
        "bytes=10-19": (10, 19),
        "bytes=100-": (100, info.size - 1),
        "bytes=-50": (info.size - 50, info.size - 1),
        f"bytes=5-{info.size + 100}": (5, info.size - 1),
    }
    for header, (first, last) in cases.items():
        async with session.get(url, headers={"Range": header}) as response:
            assert response.status == 206, header
            assert response.headers["Content-Range"] == f"bytes {first}-{last}/{info.size}"
            assert await response.read() == data[first : last + 1]
    async with session.get(url, headers={"Range": f"bytes={info.size}-"}) as response:
        assert response.status == 416
        assert response.headers["Content-Range"] == f"bytes */{info.size}"
    async with session.get(url, headers={"Range": "bytes=0-9", "If-Range": '"stale"'}) as response:
        assert response.status == 200
        assert len(await response.read()) == info.size


# -- faults --------------------------------------------------------------------


@pytest.mark.parametrize("at", [100_000, 0.5])
async def test_truncate_closes_cleanly_short(
    upstream: FakeUpstream, channel: Channel, session: aiohttp.ClientSession, at: int | float
) -> None:
    size = channel.packages[BIG].size
    expected = at if isinstance(at, int) else int(size * at)
    upstream.truncate(upath(BIG), at)
    got = [0]
    async with session.get(upstream.url + upath(BIG)) as response:
        assert response.content_length == size  # the full length is declared
        with pytest.raises(aiohttp.ClientPayloadError) as excinfo:
            await read_counting(response, got)
    assert isinstance(excinfo.value.__cause__, ContentLengthError)
    assert "ConnectionResetError" not in str(excinfo.value)  # FIN, not RST
    assert got[0] == expected


async def test_reset_aborts(
    upstream: FakeUpstream, channel: Channel, session: aiohttp.ClientSession
) -> None:
    upstream.reset(upath(BIG), 200_000)
    got = [0]
    async with session.get(upstream.url + upath(BIG)) as response:
        with pytest.raises(aiohttp.ClientPayloadError) as excinfo:
            await read_counting(response, got)
    assert "ConnectionResetError" in str(excinfo.value)  # RST, not FIN
    assert got[0] == 200_000


async def test_times_limits_a_fault_and_head_does_not_use_body_faults(
    upstream: FakeUpstream, channel: Channel, session: aiohttp.ClientSession
) -> None:
    url = upstream.url + upath(DATA)
    upstream.truncate(upath(DATA), 10, times=1)
    async with session.head(url) as response:
        assert response.status == 200
    got = [0]
    async with session.get(url) as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_counting(response, got)
    assert got[0] == 10
    async with session.get(url) as response:
        assert len(await response.read()) == channel.packages[DATA].size


async def test_status_queue_and_clear(
    upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    path = upath("noarch/repodata.json.zst")
    url = upstream.url + path
    upstream.status(path, 503, b"busy", headers={"Retry-After": "1"}, times=1)
    upstream.status(path, 500, times=1)
    upstream.status(path, 404)
    async with session.get(url) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        assert await response.read() == b"busy"
    async with session.head(url) as response:
        assert response.status == 500  # header faults apply to HEAD too
    for _ in range(2):
        async with session.get(url) as response:
            assert response.status == 404
    upstream.clear_faults()
    async with session.get(url) as response:
        assert response.status == 200


async def test_corrupt_same_length_different_bytes(
    upstream: FakeUpstream, channel: Channel, session: aiohttp.ClientSession
) -> None:
    info = channel.packages[DATA]
    upstream.corrupt(upath(DATA))
    async with session.get(upstream.url + upath(DATA)) as response:
        assert response.status == 200
        body = await response.read()
    assert len(body) == info.size
    assert hashlib.sha256(body).hexdigest() != info.sha256


async def test_replace_serves_other_bytes(
    upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    page = b"<html><body>Please log in</body></html>"
    upstream.replace(upath("noarch/repodata.json"), page)
    upstream.replace(upath("noarch/current_repodata.json"), b"{}", "application/json")
    async with session.get(upstream.url + upath("noarch/repodata.json")) as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        assert await response.read() == page
    async with session.get(upstream.url + upath("noarch/current_repodata.json")) as response:
        assert (response.status, await response.read()) == (200, b"{}")  # file need not exist


async def test_chunked(
    upstream: FakeUpstream, channel: Channel, session: aiohttp.ClientSession
) -> None:
    info = channel.packages[DATA]
    upstream.chunked(upath(DATA))
    async with session.get(upstream.url + upath(DATA)) as response:
        assert "Content-Length" not in response.headers
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert hashlib.sha256(await response.read()).hexdigest() == info.sha256
    upstream.truncate(upath(DATA), 1000)
    got = [0]
    async with session.get(upstream.url + upath(DATA)) as response:
        with pytest.raises(aiohttp.ClientPayloadError) as excinfo:
            await read_counting(response, got)
    assert isinstance(excinfo.value.__cause__, TransferEncodingError)
    assert got[0] == 1000


async def test_delay_headers_and_add_headers(
    upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    path = upath("noarch/repodata.json")
    upstream.delay_headers(path, 0.3)
    upstream.add_headers(path, {"Cache-Control": "public, max-age=60"})
    started = time.monotonic()
    async with session.get(upstream.url + path) as response:
        assert response.headers["Cache-Control"] == "public, max-age=60"
    assert time.monotonic() - started >= 0.3


async def test_throttle(
    upstream: FakeUpstream, channel: Channel, session: aiohttp.ClientSession
) -> None:
    size = channel.packages[DATA].size
    upstream.throttle(upath(DATA), size / 0.4)  # ~0.4 s for the whole body
    started = time.monotonic()
    async with session.get(upstream.url + upath(DATA)) as response:
        assert len(await response.read()) == size
    assert 0.35 <= time.monotonic() - started < 5


async def test_stall_then_continue(
    upstream: FakeUpstream, channel: Channel, session: aiohttp.ClientSession
) -> None:
    upstream.stall(upath(DATA), 0.25, 0.3)
    started = time.monotonic()
    async with session.get(upstream.url + upath(DATA)) as response:
        assert len(await response.read()) == channel.packages[DATA].size
    assert time.monotonic() - started >= 0.3


async def test_stall_forever_ends_at_close(
    upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    upstream.stall(upath(DATA), 1000, None)
    got = [0]
    async with session.get(upstream.url + upath(DATA)) as response:
        reader = asyncio.create_task(read_counting(response, got))
        await asyncio.sleep(0.2)
        assert not reader.done() and got[0] == 1000
        started = time.monotonic()
        await upstream.close()
        with pytest.raises(aiohttp.ClientError):
            await reader
    assert time.monotonic() - started < 1.5


async def test_hold_lets_the_test_see_partial_bytes(
    upstream: FakeUpstream, channel: Channel, session: aiohttp.ClientSession
) -> None:
    info = channel.packages[BIG]
    hold = upstream.hold(upath(BIG), 300_000)
    async with session.get(upstream.url + upath(BIG)) as response:
        await asyncio.wait_for(hold.reached.wait(), 5)
        assert hold.waiting == 1
        head = await response.content.readexactly(300_000)  # available before release
        assert hold.waiting == 1 and not response.content.is_eof()
        hold.release()
        body = head + await response.read()
    assert hashlib.sha256(body).hexdigest() == info.sha256
    assert hold.waiting == 0 and hold.arrivals == 1


async def test_hold_headers(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    path = upath("noarch/repodata.json")
    hold = upstream.hold_headers(path, times=1)
    request = asyncio.create_task(session.get(upstream.url + path))
    await asyncio.wait_for(hold.reached.wait(), 5)
    await asyncio.sleep(0.05)
    assert not request.done()
    hold.release()
    async with await request as response:
        assert response.status == 200


# -- the channel is a real channel: rattler solves and installs from it ----------


async def test_rattler_solves_and_installs_from_fake_upstream(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    gateway = rattler.Gateway(cache_dir=tmp_path / "repodata-cache")
    records = await rattler.solve(
        sources=[f"{upstream.url}/testchan"],
        specs=["cp-app"],
        platforms=["linux-64", "noarch"],
        gateway=gateway,
    )
    solved = {r.file_name for r in records}
    expected: dict[str, PackageInfo] = {
        info.filename: info
        for info in channel.packages.values()
        if info.name in {"cp-app", "cp-lib", "cp-base", "cp-data", "cp-tools"}
        and (info.name, info.version) != ("cp-lib", "1.0")
    }
    assert solved == set(expected)
    assert {r.subdir for r in records} == {"noarch", "linux-64"}

    prefix = tmp_path / "env"
    await rattler.install(
        records, prefix, cache_dir=tmp_path / "pkgs", show_progress=False, platform=rattler.Subdir("linux-64")
    )
    for info in expected.values():
        assert (prefix / "conda-meta" / f"{info.filename.removesuffix('.conda')}.json").is_file()
        assert (prefix / "share" / info.name / "README").is_file()
        # every package came from the fake upstream exactly once, with rattler's digest claim
        (request,) = upstream.requests_for(upath(info.url_path))
        assert request.headers.get("x-expected-sha256") == info.sha256
    assert (prefix / "lib" / "cp-data" / "blob.bin").stat().st_size == 2 * 1024 * 1024
