"""A cluster: two `condaproxy serve` nodes on one bucket (moto_server) behind real nginx running the
shipped config/nginx-cluster.conf (consistent hashing on the URI). A real client installs through
it; a node adopts what the other stored; with a node killed (kill -9), installs keep working."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from channel import Channel
from proxy import ProxyProcess, free_port
from s3 import AWS_ENV, MotoServer, object_keys, write_s3_config
from test_rattler_client import solve_and_install
from upstream import FakeUpstream

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "nginx-cluster.conf"


def find_nginx() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nginx is not installed (CI installs it: .ci/run)")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    return found


def nginx_conf(prefix: Path, port: int, nodes: list[str]) -> str:
    """The shipped cluster config with this test's nodes, port and log paths, in a whole nginx.conf."""
    shipped = SHIPPED.read_text()
    servers = "".join(f"    server {n} max_fails=1 fail_timeout=10s;\n" for n in nodes)
    shipped, count = re.subn(r"(?m)^    server 10\.0\.0\.\d+:8751 .*\n", "", shipped)
    assert count == 3, "config/nginx-cluster.conf no longer lists its example nodes as expected"
    shipped = shipped.replace("    keepalive 32;", servers + "    keepalive 32;")
    shipped = shipped.replace("listen 8750;", f"listen 127.0.0.1:{port};")
    shipped = shipped.replace("/var/log/nginx/condaproxy.log", str(prefix / "access.log"))
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers must reach our 0700 dirs
    temps = "".join(
        f"    {d}_temp_path {prefix / d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
        f"events {{ worker_connections 256; }}\nhttp {{\n{temps}{shipped}\n}}\n"
    )


@dataclass
class Cluster:
    nodes: list[ProxyProcess]
    url: str  # nginx
    access_log: Path

    def served_by(self) -> list[str]:
        """The node address of each request nginx logged so far."""
        lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
        return [line.split()[-2] for line in lines]


@pytest.fixture
def nginx_binary() -> str:
    return find_nginx()


@pytest.fixture
async def cluster(
    nginx_binary: str, moto: MotoServer, bucket: str, upstream: FakeUpstream, tmp_path: Path
) -> AsyncIterator[Cluster]:
    env = {**AWS_ENV}
    nodes = []
    for name in ("a", "b"):
        port = free_port()
        ini = write_s3_config(
            tmp_path / f"node-{name}.ini",
            tmp_path / f"cache-{name}",
            upstream.url,
            port,
            moto.url,
            bucket,
            persist_retry_max="1",
        )
        nodes.append(ProxyProcess(ini, port, env=env))
    prefix = tmp_path / "nginx"
    port = free_port()
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, port, [f"127.0.0.1:{n.port}" for n in nodes]))
    test = subprocess.run(
        [nginx_binary, "-t", "-p", str(prefix), "-c", str(conf)], capture_output=True, text=True
    )
    assert test.returncode == 0, test.stderr
    proc = None
    try:
        for node in nodes:
            await node.start()
        with open(prefix / "stderr.log", "ab") as log:
            proc = subprocess.Popen(
                [nginx_binary, "-p", str(prefix), "-c", str(conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        await wait_listening(url, proc)
        yield Cluster(nodes, url, prefix / "access.log")
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for node in nodes:
            node.stop()


async def wait_listening(url: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            assert proc.poll() is None, "nginx exited"
            try:
                async with session.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "nginx did not start"
            await asyncio.sleep(0.1)


async def fetch(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.read()


async def wait_stored(node: ProxyProcess, timeout: float = 15.0) -> None:
    """Until the node has no download in flight (its persists are done)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(node.url + "/metrics") as resp:
                text = await resp.text()
            inflight = next(
                float(x.split()[-1]) for x in text.splitlines() if x.startswith("condaproxy_inflight ")
            )
            if inflight == 0:
                return
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)


async def test_two_nodes_behind_nginx(
    cluster: Cluster, upstream: FakeUpstream, channel: Channel, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    a, b = cluster.nodes
    # 1. A real client installs through nginx: each file goes to its home node, once upstream.
    names = await solve_and_install(
        f"{cluster.url}/testchan", tmp_path / "env1", tmp_path / "c1", sharded=True
    )
    assert any(n.startswith("cp-extra-") for n in names)
    packages = [r.path for r in upstream.requests if r.path.endswith(".conda")]
    assert len(packages) == len(set(packages)) == len(names)  # one upstream fetch per package
    for node in (a, b):
        await wait_stored(node)
    homes = set(cluster.served_by())
    assert {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"} <= homes  # the ring spreads the files
    stored = await object_keys(moto.url, bucket)
    for name in names:
        assert any(k.endswith(channel.packages[_key(channel, name)].sha256) for k in stored)

    # 2. A package fetched through node A is served by node B with no new upstream request.
    pkg = channel.by_name("cp-data")
    path = f"/testchan/{pkg.url_path}"
    assert (await fetch(a.url + path))[0] == 200
    await fetch(b.url + "/testchan/linux-64/repodata.json")  # B's own metadata (per node)
    await wait_stored(b)
    upstream.reset_counts()
    status, body = await fetch(b.url + path)
    assert (status, body) == (200, pkg.read_bytes())
    assert upstream.requests == []

    # 3. Node A dies (kill -9): installs through nginx keep working; its keys move to B.
    a.kill()
    before = len(cluster.served_by())
    names2 = await solve_and_install(
        f"{cluster.url}/testchan", tmp_path / "env2", tmp_path / "c2", sharded=True
    )
    assert names2 == names
    # Packages come from the bucket (adopted by B), not upstream.
    assert not [r for r in upstream.requests if r.path.endswith(".conda")]
    await asyncio.sleep(0.2)  # nginx writes a log line when a request ends
    after = cluster.served_by()[before:]
    assert after and all(addr.endswith(f":{b.port}") for addr in after)


def _key(channel: Channel, filename: str) -> str:
    return next(k for k, p in channel.packages.items() if p.filename == filename)
