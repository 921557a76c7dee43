"""Hostile input: traversal, smuggling, oversize requests, range abuse, slow clients, secrets.

Run under both of aiohttp's HTTP parsers: `.ci/run` runs this file again with
AIOHTTP_NO_EXTENSIONS=1 (the pure-Python parser) besides the default (llhttp, in C).
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import http_parser
from channel import Channel
from proxy import (
    Proxy,
    ProxyProcess,
    check_invariants,
    free_port,
    make_config,
    raw_exchange,
    write_config,
)
from test_bad_requests import HOSTILE
from upstream import FakeUpstream

CH = "/testchan"
KILLPOINT = Path(__file__).resolve().parents[1] / "killpoint.py"
PARSER = "python" if http_parser.HttpRequestParser is http_parser.HttpRequestParserPy else "c"

MORE_HOSTILE = [
    "/testchan/noarch/%2E%2E/%2E%2E/etc/passwd",
    "/testchan/noarch/..%5c..%5cetc%5cpasswd",
    "/testchan/noarch/.%2e/repodata.json",
    "/t/tok/../testchan/noarch/repodata.json",
    "/t/../testchan/noarch/repodata.json",
    "/testchan/noarch/repodata.json/..",
    "/testchan/noarch/repodata.json%2f..%2f..%2fetc%2fpasswd",
    "/testchan/noarch/%ef%bc%8e%ef%bc%8e/repodata.json",  # fullwidth dots
    "/testchan/noarch/..%e2%88%95repodata.json",  # division slash
    "/testchan/noarch/%c0%afetc%c0%afpasswd",  # overlong "/"
    "/testchan/noarch/%e0%80%ae%e0%80%ae/x",  # overlong "."
    "/testchan/noarch/%%32%65%%32%65/repodata.json",  # double-encoding tricks
    "/testchan/Noarch/repodata.json",
    "/testchan/noarch/repodata.json%20",
    "/testchan/noarch/repodata.json%09",
    "/testchan/noarch/shards/../repodata.json",
    "/%2e%2e/%2e%2e/etc/passwd",
    "//etc/passwd",
    "/testchan/noarch/" + "a" * 300 + ".conda",
    "/a/b/c/d/e/noarch/repodata.json",
    "/testchan/noarch/repodata.json%00.conda",
    "/testchan/noarch/.repodata.json",
    "/t/tok/t/tok2/testchan/noarch/repodata.json",
    "/testchan/noarch/%7e/.ssh",
    "/testchan/.noarch/repodata.json",
    "/testchan/noarch/repodata.json%40gzip",  # internal variant names are unspellable
]


def request(target: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: proxy", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- 14: traversal --------------------------------------------------------------------------------


def units(cache: Path) -> set[tuple[str, str, str]]:
    """The catalog's rows, read beside the running proxy (WAL lets a reader in)."""
    db = sqlite3.connect(cache / "catalog.sqlite3")
    try:
        return set(db.execute("SELECT channel, subdir, filename FROM units").fetchall())
    finally:
        db.close()


async def test_hostile_paths_touch_no_file_outside_the_store(upstream: FakeUpstream, tmp_path: Path) -> None:
    """Every file the proxy opens or lists while refusing hostile paths is its own."""
    cache = tmp_path / "cache"
    opened = tmp_path / "opened.log"
    port = free_port()
    ini = write_config(tmp_path / "proxy.ini", cache, upstream.url, port)
    argv = [sys.executable, str(KILLPOINT), "record", str(opened), "--", "serve", "--config", str(ini)]
    proc = await ProxyProcess(ini, port, argv=argv).start()
    try:
        # Warm every code path first (imports open files), then record only the hostile part.
        for target in ("/healthz", f"{CH}/noarch/nothing-1-0.conda", "/testchan/noarch/%2e%2e"):
            await raw_exchange(proc.url, request(target, "Connection: close"))
        await asyncio.sleep(0.5)
        mark = opened.stat().st_size
        upstream.reset_counts()
        before = units(cache)
        for target in HOSTILE + MORE_HOSTILE:
            answer = await raw_exchange(proc.url, request(target, "Connection: close"))
            assert answer.status in (400, 404), (target, answer.raw[:200])
        await asyncio.sleep(0.3)
        with open(opened, "rb") as f:
            f.seek(mark)
            touched = {line.decode() for line in f.read().splitlines()}
        assert {p for p in touched if not p.startswith(str(cache))} == set()
        assert upstream.requests == []
        assert proc.stop() == 0
    finally:
        proc.kill()
    assert set(check_invariants(cache)) == before  # never a new cache entry


@pytest.mark.parametrize("target", MORE_HOSTILE)
async def test_more_hostile_paths_are_refused_in_process(
    proxy: Proxy, upstream: FakeUpstream, target: str
) -> None:
    answer = await raw_exchange(proxy.url, request(target, "Connection: close", "Accept: text/plain"))
    assert answer.status in (400, 404) and answer.headers["x-cache"] == "MISS"
    assert answer.body.count(b"\n") == 1  # a one-line reason
    assert upstream.requests == []
    await proxy.idle()
    assert check_invariants(proxy.config.cache.directory) == []


# -- 15: methods ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "OPTIONS * HTTP/1.1",
        "CONNECT 127.0.0.1:1 HTTP/1.1",
        "TRACE / HTTP/1.1",
        "PROPFIND /testchan/ HTTP/1.1",
    ],
)
async def test_other_methods_get_405_and_no_outbound_connection(
    proxy: Proxy, upstream: FakeUpstream, line: str
) -> None:
    answer = await raw_exchange(proxy.url, f"{line}\r\nHost: proxy\r\n\r\n".encode())
    assert answer.status in (400, 405)
    assert upstream.requests == []


# -- 16: smuggling and oversize input ----------------------------------------------------------------

STATUS_LINE = re.compile(rb"(?:^|\r\n)HTTP/1\.[01] \d{3} ")
SMUGGLING = {
    "content-length-and-chunked": request(
        f"{CH}/noarch/repodata.json", "Content-Length: 44", "Transfer-Encoding: chunked"
    )
    + b"0\r\n\r\nGET /testchan/linux-64/repodata.json HTTP/1.1\r\nHost: x\r\n\r\n",
    "duplicate-content-length": request(
        f"{CH}/noarch/repodata.json", "Content-Length: 0", "Content-Length: 46"
    )
    + b"GET /testchan/linux-64/repodata.json HTTP/1.1\r\n",
    "obs-fold": request(f"{CH}/noarch/repodata.json", "X-Folded: a", " b"),
    "bare-lf": b"GET /testchan/noarch/repodata.json HTTP/1.1\nHost: proxy\n\n",
    "bare-lf-in-headers": b"GET /testchan/noarch/repodata.json HTTP/1.1\r\nHost: proxy\nX-A: b\r\n\r\n",
    "request-line-over-8k": request(f"{CH}/noarch/" + "a" * 9000 + ".conda"),
    "header-over-8k": request(f"{CH}/noarch/repodata.json", "X-Big: " + "b" * 9000),
    "over-100-headers": request(f"{CH}/noarch/repodata.json", *(f"X-H{i}: v" for i in range(101))),
    "get-with-body": request(f"{CH}/noarch/repodata.json", "Content-Length: 58")
    + b"GET /testchan/linux-64/repodata.json HTTP/1.1\r\nHost: x\r\n\r\n",
    "get-with-chunked-body": request(f"{CH}/noarch/repodata.json", "Transfer-Encoding: chunked")
    + b"3a\r\nGET /testchan/linux-64/repodata.json HTTP/1.1\r\nHost: x\r\n\r\n\r\n0\r\n\r\n",
    "transfer-encoding-gzip-chunked": request(
        f"{CH}/noarch/repodata.json", "Transfer-Encoding: gzip, chunked"
    )
    + b"0\r\n\r\n",
    "space-before-colon": request(f"{CH}/noarch/repodata.json", "Content-Length : 3") + b"abc",
    "signed-content-length": request(f"{CH}/noarch/repodata.json", "Content-Length: +3") + b"abc",
    "nul-in-header": request(f"{CH}/noarch/repodata.json", "X-A: b\x00c"),
    "two-hosts": request(f"{CH}/noarch/repodata.json", "Host: other"),
}


@pytest.mark.parametrize("name", list(SMUGGLING))
async def test_smuggling_and_oversize_requests_get_400_and_a_closed_connection(
    proxy: Proxy, upstream: FakeUpstream, name: str
) -> None:
    answer = await raw_exchange(proxy.url, SMUGGLING[name])
    assert answer.status == 400, (PARSER, answer.raw[:300])
    assert answer.closed, f"{PARSER} parser: the connection must close after a refused request"
    # Exactly one answer: nothing hidden in a body was ever taken for a second request.
    assert len(STATUS_LINE.findall(answer.raw)) == 1, answer.raw[:500]
    assert upstream.requests == []
    await proxy.idle()
    assert check_invariants(proxy.config.cache.directory) == []


async def test_the_parser_in_use_is_named(proxy: Proxy) -> None:
    """The report names the parser, so the two CI runs are visibly different."""
    expected = "python" if os.environ.get("AIOHTTP_NO_EXTENSIONS") else "c"
    assert expected == PARSER


# -- 17: range abuse -------------------------------------------------------------------------------


@pytest.mark.parametrize("warm", [True, False], ids=["hit", "streaming"])
async def test_range_abuse_gets_200_or_416_quickly(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel, warm: bool
) -> None:
    pkg = channel.by_name("cp-data")
    path = f"{CH}/{pkg.url_path}"
    if warm:
        await proxy.get(path)
        await proxy.idle()
    else:
        upstream.throttle(path, 4 << 20)
    body = pkg.read_bytes()
    many = "bytes=" + ",".join(f"{i}-{i + 100}" for i in range(0, 1000))
    cases = {
        many: (200, body),  # 1,000 overlapping ranges: a whole body is always a valid answer
        "bytes=" + ",".join("0-1" for _ in range(1000)): (200, body),
        f"bytes={pkg.size}-": (416, b""),
        f"bytes={pkg.size * 10}-{pkg.size * 20}": (416, b""),
        "bytes=" + "9" * 4000 + "-": (416, b""),
        "bytes=0-" + "9" * 4000: (206, body),
        "bytes=abc": (200, body),
        "items=0-10": (200, body),
        "bytes=--1": (200, body),
        "bytes=5-1": (200, body),
        "bytes=-0": (416, b""),
    }
    started = time.monotonic()
    results = await asyncio.wait_for(
        asyncio.gather(*(proxy.get(path, headers={"Range": r}) for r in cases)), 30
    )
    for (rng, (status, want)), got in zip(cases.items(), results, strict=True):
        assert got.status == status, (rng[:40], got.status)
        assert got.body == want and got.error is None, rng[:40]
        if status == 416:
            assert got.headers["Content-Range"] == f"bytes */{pkg.size}"
    assert time.monotonic() - started < 30
    await proxy.idle()
    check_invariants(proxy.config.cache.directory)


# -- 18: slow clients --------------------------------------------------------------------------------


async def test_a_request_head_must_arrive_within_the_client_timeout(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await Proxy(make_config(tmp_path / "cache", upstream.url), client_timeout=1.0).start()
    try:
        host, port = proxy.url.removeprefix("http://").split(":")
        slow: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for _ in range(50):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /testchan/noarch/repodata.json HTTP/1.1\r\nHost: x\r\n")
            slow.append((reader, writer))
        idle_reader, idle_writer = await asyncio.open_connection(host, int(port))  # says nothing at all
        started = time.monotonic()

        async def trickle_until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
            # One header byte every 200 ms: never a complete head, always some traffic.
            got = b""
            while True:
                try:
                    writer.write(b"X")
                    await writer.drain()
                    chunk = await asyncio.wait_for(reader.read(1024), 0.2)
                except TimeoutError:
                    continue
                except ConnectionError:
                    return got
                if not chunk:
                    return got
                got += chunk

        answers = await asyncio.wait_for(
            asyncio.gather(*(trickle_until_closed(r, w) for r, w in slow), idle_reader.read()), 10
        )
        assert all(a == b"" for a in answers), "slow heads are dropped, not answered"
        assert time.monotonic() - started < 5
        for _, writer in slow:
            writer.close()
        idle_writer.close()

        # A keep-alive connection left idle after a response is closed too.
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request("/healthz"))
        first = await asyncio.wait_for(reader.readuntil(b"ok\n"), 5)
        assert first.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        await proxy.close()


async def test_the_client_timeout_never_cuts_a_long_download(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    proxy = await Proxy(make_config(tmp_path / "cache", upstream.url), client_timeout=0.5).start()
    try:
        pkg = channel.by_name("cp-tools")
        path = f"{CH}/{pkg.url_path}"
        upstream.throttle(path, 1 << 20)  # three seconds, six client timeouts
        slow = await proxy.get(path)
        assert slow.error is None and slow.body == pkg.read_bytes()
        await proxy.idle()
        check_invariants(proxy.config.cache.directory)
    finally:
        await proxy.close()


async def test_500_slowloris_connections_do_not_slow_a_normal_client(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    port = free_port()
    ini = write_config(tmp_path / "proxy.ini", tmp_path / "cache", upstream.url, port)
    proc = await ProxyProcess(ini, port).start()
    pkg = channel.by_name("cp-lib")
    path = f"{proc.url}{CH}/{pkg.url_path}"
    try:
        async with aiohttp.ClientSession() as session:

            async def latencies(n: int) -> list[float]:
                out = []
                for _ in range(n):
                    started = time.perf_counter()
                    async with session.get(path) as resp:
                        assert resp.status == 200 and await resp.read() == pkg.read_bytes()
                    out.append(time.perf_counter() - started)
                return out

            await latencies(3)  # cached, connection warm
            before = await latencies(30)
            stop = asyncio.Event()
            conns: list[asyncio.StreamWriter] = []
            for _ in range(500):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /testchan/noarch/repodata.json HTTP/1.1\r\nHost: x\r\n")
                conns.append(writer)

            async def trickle() -> None:
                while not stop.is_set():
                    for writer in conns:
                        if not writer.is_closing():
                            writer.write(b"X-Slow: y\r\n")
                    await asyncio.sleep(0.5)

            trickler = asyncio.ensure_future(trickle())
            await asyncio.sleep(0.5)
            during = await latencies(30)
            stop.set()
            await trickler
            assert proc.open_fds() > 500  # they are all being held open by the proxy
            for writer in conns:
                writer.close()
        print(
            f"slowloris: median {statistics.median(before) * 1000:.1f} ms quiet, "
            f"{statistics.median(during) * 1000:.1f} ms beside 500 slow connections (max {max(during) * 1000:.1f} ms)"
        )
        # Generous bounds (machines are noisy): within 10x of the quiet median, and under 1 s.
        assert statistics.median(during) < max(10 * statistics.median(before), 0.05), (before, during)
        assert max(during) < 1.0, during
        assert proc.stop() == 0
    finally:
        proc.kill()


# -- 19: secrets ---------------------------------------------------------------------------------------

TOKEN = "tk-CLIENT-SECRET-9f8e7d6c"
AUTH = "Bearer AUTH-SECRET-1a2b3c4d"


async def test_client_tokens_and_credentials_are_never_recorded_nor_forwarded(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    port = free_port()
    ini = write_config(tmp_path / "proxy.ini", cache, upstream.url, port)
    argv = [sys.executable, "-m", "condaproxy", "--log-level", "debug", "serve", "--config", str(ini)]
    proc = await ProxyProcess(ini, port, argv=argv).start()
    pkg = channel.by_name("cp-data")
    upstream.status(f"{CH}/linux-64/current_repodata.json", 503)
    upstream.reset(f"{CH}/{channel.by_name('cp-tools').url_path}", 0.5)
    headers = {"Authorization": AUTH, "Proxy-Authorization": AUTH, "Cookie": f"token={TOKEN}"}
    seen: list[bytes] = []
    try:
        async with aiohttp.ClientSession() as session:
            for path in (
                f"/t/{TOKEN}{CH}/noarch/repodata.json",
                f"/t/{TOKEN}{CH}/{pkg.url_path}",
                f"/t/{TOKEN}{CH}/noarch/missing-1.0-0.conda",  # 404
                f"/t/{TOKEN}{CH}/linux-64/current_repodata.json",  # 502
                f"/t/{TOKEN}{CH}/{channel.by_name('cp-tools').url_path}",  # aborted
                f"/t/{TOKEN}{CH}/noarch/%2e%2e",  # 400
                f"/t/{TOKEN}/t/{TOKEN}{CH}/noarch/repodata.json",  # 400
                f"/t/{TOKEN}{CH}/{pkg.url_path}",  # a hit
            ):
                try:
                    async with session.get(proc.url + path, headers=headers) as resp:
                        seen.append(await resp.read())
                except aiohttp.ClientError:
                    pass
            # Malformed requests too: the parser's complaint must not quote the token back.
            for raw in (
                f"GET /t/{TOKEN}{CH}/noarch/repodata.json HTTP/1.1\nHost: x\n\n",
                f"GET /t/{TOKEN}{CH}/noarch/repodata.json HTTP/1.1\r\nHost: x\r\nX: a\x00\r\n\r\n",
                f"GET /t/{TOKEN}{CH}/noarch/{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n",
                f"GET /testchan/noarch/repodata.json HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\nX: y\r\n\r\n",
                f"get /t/{TOKEN}{CH}/noarch/repodata.json HTTP/1.1\r\nHost: x\r\n\r\n",
            ):
                await raw_exchange(proc.url, raw.encode(), read_until_close=False)
            await asyncio.sleep(0.5)
            async with session.get(proc.url + "/metrics") as resp:
                seen.append(await resp.read())
    finally:
        assert proc.stop() == 0
    log = proc.log.read_bytes()
    assert b"/t/<redacted>/testchan/" in log  # the requests were logged, redacted
    places: dict[str, bytes] = {"log": log, "answers": b"\n".join(seen)}
    for file in cache.rglob("*"):
        if file.is_file():
            places[str(file)] = file.name.encode() + b"\n" + file.read_bytes()
    for request_ in upstream.requests:
        places[f"upstream {request_.path}"] = f"{request_.path} {dict(request_.headers)}".encode()
    for where, data in places.items():
        for secret in (TOKEN, AUTH.split()[1]):
            assert secret.encode() not in data, f"{secret} found in {where}"
    check_invariants(cache)
