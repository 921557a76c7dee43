"""Hits from S3 with and without [store] local_cache, and the upstream requests of a two-node install.

One bounded run, everything on 127.0.0.1: the test channel (py-rattler-build) behind the tests'
FakeUpstream, moto_server as the S3 endpoint, `condaproxy serve` nodes as child processes, and
nginx with config/nginx-cluster.conf for the two-node install. Figures are printed, never
asserted. moto is a Python server: hits that go to it measure moto as much as condaproxy.

    .venv/bin/python benchmarks/s3_cluster.py [--requests 60] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from channel import build_channel  # noqa: E402
from proxy import ProxyProcess, free_port  # noqa: E402
from s3 import AWS_ENV, MotoServer, create_bucket, write_s3_config  # noqa: E402
from test_cluster import find_nginx, nginx_conf, wait_listening  # noqa: E402
from test_rattler_client import solve_and_install  # noqa: E402
from upstream import FakeUpstream  # noqa: E402


async def hits(url: str, requests: int, concurrency: int) -> tuple[float, float]:
    """(requests per second, MB per second) of `requests` GETs of url, `concurrency` at a time."""
    total = 0
    queue = list(range(requests))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal total
        while queue:
            queue.pop()
            async with session.get(url) as resp:
                assert resp.status == 200 and resp.headers["X-Cache"] == "HIT", resp.status
                async for chunk in resp.content.iter_any():
                    total += len(chunk)

    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        took = time.perf_counter() - started
    return requests / took, total / took / 1e6


async def hit_figures(
    tmp: Path, upstream: FakeUpstream, moto: MotoServer, path: str, args: argparse.Namespace
) -> None:
    for label, extra in (("S3, no local_cache", {}), ("S3, local_cache = 1G", {"local_cache": "1G"})):
        bucket = await create_bucket(moto.url, f"bench-{len(label)}-{int(time.time())}")
        port = free_port()
        ini = write_s3_config(
            tmp / f"{bucket}.ini", tmp / f"cache-{bucket}", upstream.url, port, moto.url, bucket, **extra
        )
        node = await ProxyProcess(ini, port, env=AWS_ENV).start()
        try:
            async with aiohttp.ClientSession() as session:
                await (await session.get(node.url + "/testchan/linux-64/repodata.json")).read()
                await (await session.get(node.url + path)).read()  # the miss
                await asyncio.sleep(1.0)  # persisted (and, with local_cache, copied)
            rps, mbps = await hits(node.url + path, args.requests, args.concurrency)
            print(f"  {label:<24} {rps:8.1f} hits/s {mbps:9.1f} MB/s")
        finally:
            node.stop()


async def install_figures(tmp: Path, upstream: FakeUpstream, moto: MotoServer) -> None:
    bucket = await create_bucket(moto.url, f"bench-cluster-{int(time.time())}")
    nodes = []
    for name in ("a", "b"):
        port = free_port()
        ini = write_s3_config(
            tmp / f"n{name}.ini", tmp / f"cache-n{name}", upstream.url, port, moto.url, bucket
        )
        nodes.append(await ProxyProcess(ini, port, env=AWS_ENV).start())
    prefix = tmp / "nginx"
    prefix.mkdir()
    port = free_port()
    (prefix / "nginx.conf").write_text(nginx_conf(prefix, port, [f"127.0.0.1:{n.port}" for n in nodes]))
    nginx = subprocess.Popen(
        [find_nginx(), "-p", str(prefix), "-c", str(prefix / "nginx.conf")], start_new_session=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_listening(url, nginx)
        upstream.reset_counts()
        started = time.perf_counter()
        names = await solve_and_install(f"{url}/testchan", tmp / "env1", tmp / "c1", sharded=True)
        took = time.perf_counter() - started
        pkgs = sum(1 for r in upstream.requests if r.path.endswith(".conda"))
        print(
            f"  cold install through nginx, 2 nodes: {len(names)} packages, {len(upstream.requests)} upstream "
            f"requests ({pkgs} for packages), {took:.1f} s"
        )
        await asyncio.sleep(1.0)
        upstream.reset_counts()
        await solve_and_install(f"{url}/testchan", tmp / "env2", tmp / "c2", sharded=True)
        print(f"  second client, warm cluster:       {len(upstream.requests)} upstream requests")
        nodes[0].kill()
        upstream.reset_counts()
        await solve_and_install(f"{url}/testchan", tmp / "env3", tmp / "c3", sharded=True)
        pkgs = sum(1 for r in upstream.requests if r.path.endswith(".conda"))
        print(
            f"  third client, node A killed:       {len(upstream.requests)} upstream requests ({pkgs} for packages)"
        )
    finally:
        nginx.terminate()
        nginx.wait()
        for node in nodes:
            node.stop()


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        channel = build_channel(tmp / "channel")
        big = channel.by_name("cp-big")
        moto = MotoServer(tmp / "moto.log").start()
        upstream = FakeUpstream()
        upstream.mount("testchan", channel.path)
        await upstream.start()
        try:
            print(
                f"hits of {big.filename} ({big.size / 1e6:.1f} MB), {args.requests} GETs, {args.concurrency} at a time:"
            )
            await hit_figures(tmp, upstream, moto, f"/testchan/{big.url_path}", args)
            print("two nodes on one bucket behind nginx (config/nginx-cluster.conf):")
            await install_figures(tmp, upstream, moto)
        finally:
            await upstream.close()
            moto.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=4)
    asyncio.run(main(parser.parse_args()))
