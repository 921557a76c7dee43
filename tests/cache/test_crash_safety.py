"""Complete or invisible, across crashes: kill -9 mid-download and mid-persist, then restart."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time

import aiohttp
from channel import Channel
from proxy import Proxy, ProxyProcess, check_invariants, free_port, make_config, write_config
from upstream import FakeUpstream

CH = "/testchan"


async def test_startup_sweeps_temp_files_and_interrupted_puts(upstream: FakeUpstream, tmp_path) -> None:
    cache = tmp_path / "cache"
    proxy = await Proxy(make_config(cache, upstream.url)).start()
    await proxy.get(f"{CH}/noarch/repodata.json")
    await proxy.idle()
    await proxy.close()
    # Leave what a crash would: a temp file, and a blob whose put never committed.
    (cache / "tmp" / "00000001-dead.part").write_bytes(b"half a package")
    orphan = "ab" * 32
    (cache / "blobs" / "ab").mkdir(exist_ok=True)
    (cache / "blobs" / "ab" / orphan).write_bytes(b"never committed")
    db = sqlite3.connect(cache / "catalog.sqlite3")
    db.execute("INSERT INTO pending (blob_key, since) VALUES (?, ?)", (orphan, time.time()))
    db.commit()
    db.close()
    proxy = await Proxy(make_config(cache, upstream.url)).start()
    try:
        rows = check_invariants(cache)
        # (plus the revision history's own row for that repodata.json, named with an "@")
        assert [r for r in rows if "@" not in r[2]] == [("testchan", "noarch", "repodata.json")]
        assert (await proxy.get(f"{CH}/noarch/repodata.json")).xcache == "HIT"
    finally:
        await proxy.close()


async def test_kill_9_mid_download_then_restart_serves_whole_file(
    upstream: FakeUpstream, channel: Channel, tmp_path
) -> None:
    pkg = channel.by_name("cp-big")
    path = f"{CH}/{pkg.url_path}"
    cache = tmp_path / "cache"
    port = free_port()
    config = write_config(tmp_path / "proxy.ini", cache, upstream.url, port)
    proc = await ProxyProcess(config, port).start()
    hold = upstream.hold(path, 0.5, times=1)
    try:
        async with aiohttp.ClientSession() as session:
            resp = await session.get(proc.url + path)
            await asyncio.wait_for(hold.reached.wait(), 15)
            await resp.content.readexactly(1000)
            proc.kill()
            try:
                await resp.read()
                cut = False
            except aiohttp.ClientError:
                cut = True
            assert cut, "the client must see the transfer break, not a clean end"
            resp.close()
        hold.release()
        # The temp file is still there: nothing cleaned up after kill -9.
        assert list((cache / "tmp").iterdir())
        proc = await ProxyProcess(config, port).start()
        check_invariants(cache)
        async with aiohttp.ClientSession() as session, session.get(proc.url + path) as again:
            body = await again.read()
            assert again.status == 200 and again.headers["X-Cache"] == "MISS"
        assert body == pkg.read_bytes()
        async with aiohttp.ClientSession() as session:
            for _ in range(50):
                async with session.get(proc.url + path) as hit:
                    if hit.headers["X-Cache"] == "HIT":
                        assert await hit.read() == pkg.read_bytes()
                        break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("never became a hit")
        assert proc.stop() == 0
        check_invariants(cache)
    finally:
        proc.kill()


async def test_kill_9_loop_during_persist_keeps_invariants(
    upstream: FakeUpstream, channel: Channel, tmp_path
) -> None:
    """Kill at varied points around persisting; every restart finds a consistent store."""
    cache = tmp_path / "cache"
    port = free_port()
    config = write_config(tmp_path / "proxy.ini", cache, upstream.url, port)
    pkgs = sorted(channel.packages.values(), key=lambda p: p.filename)
    for i, delay in enumerate((0.0, 0.02, 0.05, 0.1, 0.2)):
        proc = await ProxyProcess(config, port).start()
        try:
            check_invariants(cache)
            async with aiohttp.ClientSession() as session:
                gets = [
                    asyncio.ensure_future(session.get(proc.url + f"{CH}/{p.url_path}"))
                    for p in pkgs[i % 2 :: 2]
                ]
                await asyncio.sleep(delay)
                proc.kill()
                for fut in gets:
                    try:
                        resp = await fut
                        await resp.read()
                    except aiohttp.ClientError:
                        pass
        finally:
            proc.kill()
    proc = await ProxyProcess(config, port).start()
    try:
        check_invariants(cache)
        async with aiohttp.ClientSession() as session:
            for p in pkgs:
                async with session.get(proc.url + f"{CH}/{p.url_path}") as resp:
                    assert await resp.read() == p.read_bytes()
        assert proc.stop() == 0
        check_invariants(cache)
    finally:
        proc.kill()
    assert os.listdir(cache / "tmp") == []
