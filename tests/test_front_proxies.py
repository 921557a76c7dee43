"""Real nginx and real Squid in front of condaproxy, each with the configuration shipped in
config/ (its cache on): a py-rattler install goes through it; a package asked for again comes
from the front's cache; repodata never outlives condaproxy's max-age there; concurrent cold
requests still make one upstream fetch; X-Forwarded-For is believed from the front only."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from channel import Channel
from proxy import Proxy, check_invariants, free_port, make_config
from test_rattler_client import solve_and_install
from upstream import FakeUpstream

CONFIG = Path(__file__).resolve().parent.parent / "config"
IN_CI = os.environ.get("CI") == "true"
TTL = 2  # repodata_ttl: short, so that the test can see it run out


def need(tool: str) -> str:
    """The tool's path: a skip when it is missing, a failure under CI=true."""
    for folder in ("", "/usr/sbin/", "/sbin/"):
        if found := shutil.which(folder + tool if folder else tool):
            return found
    if IN_CI:
        pytest.fail(f"{tool} is not installed (CI=true: .ci/run installs it)")
    pytest.skip(f"{tool} is not installed")


def nginx_conf(work: Path, port: int, backend: int) -> Path:
    site = (CONFIG / "nginx-condaproxy.conf").read_text()
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    site = site.replace("server 127.0.0.1:8751;", f"server 127.0.0.1:{backend};")
    site = site.replace("/var/cache/nginx/condaproxy", str(work / "cache"))
    (work / "site.conf").write_text(site)
    user = "user root root;\n" if os.geteuid() == 0 else ""
    main = (
        f"{user}daemon off;\nworker_processes 1;\npid {work}/nginx.pid;\nerror_log {work}/error.log info;\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{\n  access_log {work}/access.log;\n  client_body_temp_path {work}/body;\n"
        f"  proxy_temp_path {work}/proxy_temp;\n  include {work}/site.conf;\n}}\n"
    )
    (work / "nginx.conf").write_text(main)
    return work / "nginx.conf"


def squid_conf(work: Path, port: int, backend: int) -> Path:
    text = (CONFIG / "squid-condaproxy.conf").read_text()
    text = text.replace("http_port 80 accel", f"http_port 127.0.0.1:{port} accel")
    text = text.replace("cache_peer 127.0.0.1 parent 8751 0", f"cache_peer 127.0.0.1 parent {backend} 0")
    text += (
        f"pid_filename {work}/squid.pid\ncache_log {work}/cache.log\naccess_log stdio:{work}/access.log\n"
        f"coredump_dir {work}\nshutdown_lifetime 0 seconds\n"
    )
    if os.geteuid() == 0:
        # Squid will not run as root: it drops to its own user, which must reach these files.
        text += "cache_effective_user proxy\n"
    (work / "squid.conf").write_text(text)
    return work / "squid.conf"


@asynccontextmanager
async def front(kind: str, work: Path, backend: int) -> AsyncIterator[str]:
    """Run nginx or Squid on a free port in front of 127.0.0.1:backend; yields its URL."""
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o777)
    port = free_port()
    if kind == "nginx":
        argv = [need("nginx"), "-e", str(work / "stderr.log"), "-p", str(work), "-c", str(nginx_conf(work, port, backend))]
    else:
        argv = [need("squid"), "-N", "-f", str(squid_conf(work, port, backend))]
    with open(work / "console.log", "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"{kind} exited: {(work / 'console.log').read_text()}"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"{kind} did not listen: {(work / 'console.log').read_text()}"
                await asyncio.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM if kind == "nginx" else signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class AccessLines(logging.Handler):
    """condaproxy's access lines, as the access logger emits them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            self.lines.append(fields)

    def count(self, path: str) -> int:
        return sum(1 for line in self.lines if line["path"] == path)


@pytest.fixture
async def backend(upstream: FakeUpstream, tmp_path: Path) -> AsyncIterator[tuple[Proxy, AccessLines]]:
    config = make_config(tmp_path / "cache", upstream.url, repodata_ttl=TTL)
    lazy = replace(config.lazy, trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
    proxy = await Proxy(replace(config, lazy=lazy)).start()
    lines = AccessLines()
    access = logging.getLogger("condaproxy.access")
    level = access.level
    access.addHandler(lines)
    access.setLevel(logging.INFO)
    try:
        yield proxy, lines
    finally:
        access.removeHandler(lines)
        access.setLevel(level)
        await proxy.close()


async def get(url: str, *, local: str = "127.0.0.1", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connector = aiohttp.TCPConnector(local_addr=(local, 0), force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, auto_decompress=False) as session,
        session.get(url, headers=headers or {}) as resp,
    ):
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


def front_hit(kind: str, headers: dict[str, str]) -> bool:
    if kind == "nginx":
        return headers.get("x-front-cache") == "HIT"
    return "HIT from" in headers.get("x-cache", "") or "hit" in headers.get("x-cache-lookup", "").lower()


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("kind", ["nginx", "squid"])
async def test_behind_a_caching_front(
    kind: str, backend: tuple[Proxy, AccessLines], upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    proxy, access = backend
    # Squid drops root for its own user, which cannot reach into pytest's 0700 folders.
    work = Path(tempfile.mkdtemp(prefix=f"condaproxy-{kind}-"))
    try:
        await _exercise(kind, work, proxy, access, upstream, channel, tmp_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _exercise(
    kind: str, work: Path, proxy: Proxy, access: AccessLines, upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    async with front(kind, work, int(proxy.url.rsplit(":", 1)[1])) as url:
        # 1. A real client installs through the front.
        names = await solve_and_install(f"{url}/testchan", tmp_path / "env", tmp_path / "client", sharded=False)
        assert any(n.startswith("cp-extra-") for n in names)
        await proxy.idle()

        # 2. A package asked for again is served by the front: condaproxy does not see it.
        pkg = channel.by_name("cp-tools")
        path = f"/testchan/{pkg.url_path}"
        status, headers, body = await get(url + path)
        if not front_hit(kind, headers):  # the install may have been its first: now it is cached
            await eventually(lambda: access.count(path) >= 1)
            status, headers, body = await get(url + path)
        seen = access.count(path)
        status, headers, body = await get(url + path)
        assert status == 200 and body == pkg.read_bytes() and front_hit(kind, headers), headers
        assert access.count(path) == seen

        # 3. Repodata is never served by the front past condaproxy's max-age.
        repo = "/testchan/noarch/repodata.json"
        status, headers, first = await get(url + repo)
        assert status == 200 and "max-age=" in headers["cache-control"]
        upstream.replace(repo, first.replace(b'"packages"', b'"info": {"changed": 1}, "packages"', 1), "application/json")
        await asyncio.sleep(TTL + 1.2)  # both the front's and condaproxy's lifetime run out
        status, headers, fresh = await get(url + repo)
        assert status == 200 and b'"changed": 1' in fresh, headers
        upstream.clear_faults(repo)

        # 4. Concurrent cold requests through the front: one upstream fetch.
        big = channel.by_name("cp-lib", "1.0")  # the one package the install did not fetch
        hold = upstream.hold(f"/testchan/{big.url_path}", at=0.5)
        fetches = [asyncio.ensure_future(get(f"{url}/testchan/{big.url_path}")) for _ in range(6)]
        await asyncio.wait_for(hold.reached.wait(), 20)
        await asyncio.sleep(0.5)  # let the other requests reach the front while the first is held
        hold.release()
        for status, _, body in await asyncio.gather(*fetches):
            assert status == 200 and body == big.read_bytes()
        assert upstream.count(f"/testchan/{big.url_path}") == 1

        # 5. The client's address comes from the trusted front's X-Forwarded-For...
        access.lines.clear()
        await get(f"{url}/testchan/linux-64/repodata.json", local="127.0.0.2")
        assert {line["client"] for line in access.lines} <= {"127.0.0.2"}
        assert access.lines, "the front answered from its cache: pick a path it has not cached"
    # ...and not from anybody else.
    access.lines.clear()
    await get(f"{proxy.url}/testchan/noarch/repodata.json", local="127.0.0.3", headers={"X-Forwarded-For": "203.0.113.9"})
    assert [line["client"] for line in access.lines] == ["127.0.0.3"]
    await proxy.idle()
    check_invariants(proxy.config.cache.directory)
