"""The `condaproxy serve` command as a user runs it, and its operational endpoints."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from channel import Channel
from proxy import Proxy, ProxyProcess, check_invariants, free_port, write_config
from upstream import FakeUpstream


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_serve_with_builtin_defaults(tmp_path: Path) -> None:
    """`condaproxy serve` alone: lo, port 8751, a per-user data directory, no other service."""
    if not port_free(8751):
        pytest.skip("port 8751 is taken on this machine")
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "condaproxy", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get("http://127.0.0.1:8751/healthz") as resp:
                        assert resp.status == 200
                        break
                except aiohttp.ClientError:
                    assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
        assert (tmp_path / "data" / "condaproxy" / "catalog.sqlite3").exists()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out.decode()
    assert b"Traceback" not in out


async def test_serve_bad_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ini"
    bad.write_text("[lazy]\nstreamer_port = seventy\n")
    proc = subprocess.run(
        [sys.executable, "-m", "condaproxy", "serve", "--config", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr and "[lazy]" in proc.stderr and "streamer_port" in proc.stderr


async def test_port_in_use_is_one_line(tmp_path: Path, upstream: FakeUpstream) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "p.ini", tmp_path / "cache", upstream.url, port)
        proc = subprocess.run(
            [sys.executable, "-m", "condaproxy", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "cannot listen" in proc.stderr


async def test_metrics_and_healthz(proxy: Proxy, channel: Channel) -> None:
    pkg = channel.by_name("cp-app")
    await proxy.get(f"/testchan/{pkg.url_path}")
    await proxy.idle()
    await proxy.get(f"/testchan/{pkg.url_path}")
    health = await proxy.get("/healthz")
    assert health.status == 200
    metrics = (await proxy.get("/metrics")).body.decode()
    assert 'condaproxy_responses_total{cache="HIT",status="200"} 1.0' in metrics
    assert 'condaproxy_upstream_fetches_total{kind="package"}' in metrics
    assert 'condaproxy_persisted_total{kind="package"}' in metrics


async def test_tokens_never_reach_logs_or_catalog(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    token = "tk-SECRET-0123456789"
    port = free_port()
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "p.ini", cache, upstream.url, port)
    proc = await ProxyProcess(config, port).start()
    pkg = channel.by_name("cp-app")
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.get(f"{proc.url}/t/{token}/testchan/{pkg.url_path}") as resp:
                    assert await resp.read() == pkg.read_bytes()
                await asyncio.sleep(0.3)
            async with session.get(f"{proc.url}/metrics") as resp:
                assert token not in await resp.text()
    finally:
        proc.stop()
    log = proc.log.read_text()
    assert "/t/<redacted>/testchan" in log
    for path in [proc.log, *cache.rglob("*")]:
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    assert all(token not in r.path and token not in str(dict(r.headers)) for r in upstream.requests)


KILLPOINT = Path(__file__).with_name("killpoint.py")


async def test_sigterm_while_a_client_streams_exits_within_the_grace(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    """systemd stops the unit with SIGTERM, then kills it after TimeoutStopSec (60 s)."""
    grace = 4
    port = free_port()
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "p.ini", cache, upstream.url, port, lazy={"shutdown_grace": str(grace)})
    proc = await ProxyProcess(config, port).start()
    slow, whole = channel.by_name("cp-big"), channel.by_name("cp-tools")
    upstream.throttle(f"/testchan/{slow.url_path}", 64 * 1024)  # 6 MiB: a minute and a half
    got: list[bytes] = []
    flowing = asyncio.Event()

    async def stream(resp: aiohttp.ClientResponse) -> None:
        async for chunk in resp.content.iter_any():
            got.append(chunk)
            flowing.set()

    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proc.url}/testchan/linux-64/repodata.json") as meta:
                assert meta.status == 200 and await meta.read()
            async with session.get(f"{proc.url}/testchan/{slow.url_path}") as streaming:
                reader = asyncio.ensure_future(stream(streaming))
                await asyncio.wait_for(flowing.wait(), 10)
                # A package whose client has every byte: verified, its persist queued or running.
                async with session.get(f"{proc.url}/testchan/{whole.url_path}") as done:
                    assert await done.read() == whole.read_bytes()
                assert proc.proc is not None
                proc.proc.send_signal(signal.SIGTERM)
                try:
                    code = await asyncio.to_thread(proc.proc.wait, grace + 5)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"still running {grace + 5} s after SIGTERM (grace {grace} s)")
                with pytest.raises(aiohttp.ClientError):
                    await asyncio.wait_for(reader, 10)  # cut off, never a clean end
    finally:
        proc.kill()
    assert code == 0, proc.log.read_text()
    assert sum(map(len, got)) < slow.size
    rows = check_invariants(cache)
    assert ("testchan", "linux-64", whole.filename) in rows, "a verified download was not persisted"
    assert ("testchan", "linux-64", slow.filename) not in rows


async def test_temp_files_are_removed_off_the_event_loop(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    """Unlinking a GiB-sized temp file takes a third of a second: never on the loop's thread."""
    removes = tmp_path / "removes.log"
    port = free_port()
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "p.ini", cache, upstream.url, port)
    argv = [sys.executable, str(KILLPOINT), "threads", "os.remove", str(removes), "--"]
    argv += ["serve", "--config", str(config)]
    proc = await ProxyProcess(config, port, argv=argv).start()
    pkg = channel.by_name("cp-big")
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proc.url}/testchan/{pkg.url_path}") as resp:
                assert await resp.read() == pkg.read_bytes()
            deadline = time.monotonic() + 10
            while list((cache / "tmp").iterdir()):
                assert time.monotonic() < deadline, "the temp file was never removed"
                await asyncio.sleep(0.05)
    finally:
        proc.stop()
    removed = [line for line in removes.read_text().splitlines() if ".part" in line]
    assert removed, "no temp file removal was seen"
    on_loop = [line for line in removed if line.startswith("MainThread\t")]
    assert not on_loop, on_loop
