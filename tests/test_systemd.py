"""`condaproxy serve` under systemd: the unit file verifies, and a test that plays the service
manager (a datagram socket as $NOTIFY_SOCKET) sees READY=1, STATUS=, WATCHDOG=1, RELOADING=1 on
SIGHUP (which reloads channel sections and reopens the access log) and STOPPING=1."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from channel import Channel
from proxy import ProxyProcess, free_port, write_config
from upstream import FakeUpstream

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "condaproxy.service"
IN_CI = os.environ.get("CI") == "true"


def need(tool: str) -> str:
    """The tool's path; a skip when it is missing, a failure under CI=true."""
    path = shutil.which(tool)
    if path is None:
        if IN_CI:
            pytest.fail(f"{tool} is not installed (CI=true: .ci/run installs it)")
        pytest.skip(f"{tool} is not installed")
    return path


def test_unit_file_verifies(tmp_path: Path) -> None:
    analyze = need("systemd-analyze")
    result = subprocess.run(
        [analyze, "verify", str(UNIT)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    text = UNIT.read_text()
    assert "\nType=notify\n" in text and "\nWatchdogSec=" in text and "ExecReload=" in text


class FakeSystemd:
    """The notify socket's receiving end: collects every datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def until(self, field: str, timeout: float = 20.0) -> str:
        """Wait for a datagram holding field (a line such as READY=1, or a prefix such as STATUS=)."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        seen = len(self.messages)
        while True:
            for message in self.messages[seen:]:
                if any(line == field or (field.endswith("=") and line.startswith(field)) for line in message.split("\n")):
                    return message
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {field} in {self.messages}")
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), left)
            except TimeoutError:
                continue
            self.messages.append(data.decode())

    def close(self) -> None:
        self.sock.close()


async def test_notify_watchdog_reload_and_stop(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    port = free_port()
    access = tmp_path / "access.log"
    config = write_config(tmp_path / "p.ini", tmp_path / "cache", upstream.url, port)
    base = config.read_text()
    config.write_text(
        base.replace("[upstream]", "[upstream]\nallow_unlisted = no")
        + f"[log]\nformat = json\naccess_log = {access}\n[channel:testchan]\nurl = {upstream.url}/testchan\n"
    )
    systemd = FakeSystemd(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "300000"}
    proc = ProxyProcess(config, port, env=env)
    with open(proc.log, "ab") as out:
        proc.proc = subprocess.Popen(proc.argv, stdout=out, stderr=subprocess.STDOUT, env=proc.env)
    try:
        ready = await systemd.until("READY=1")
        # READY means listening and the catalog open: the very next connection is served.
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proc.url}/readyz") as resp:
                assert resp.status == 200
            assert f"127.0.0.1:{port}" in ready
            await systemd.until("WATCHDOG=1")
            await systemd.until("WATCHDOG=1")
            async with session.get(f"{proc.url}/renamed/noarch/repodata.json") as resp:
                assert resp.status == 404  # not configured (allow_unlisted = no)
            # SIGHUP: a new channel section is served, the moved access log is written anew.
            config.write_text(config.read_text() + f"[channel:renamed]\nurl = {upstream.url}/testchan\n")
            access.rename(tmp_path / "access.log.1")
            proc.proc.send_signal(signal.SIGHUP)
            await systemd.until("RELOADING=1")
            await systemd.until("READY=1")
            async with session.get(f"{proc.url}/renamed/noarch/repodata.json") as resp:
                assert resp.status == 200
            for _ in range(50):  # the access file is written by a thread of its own
                if access.exists() and access.read_text():
                    break
                await asyncio.sleep(0.1)
            line = json.loads(access.read_text().splitlines()[-1])
            assert line["path"] == "/renamed/noarch/repodata.json" and line["channel"] == "renamed"
            assert line["kind"] == "repodata" and line["x_cache"] == "MISS" and line["upstream_time"] is not None
            assert {"time", "client", "method", "status", "bytes", "duration"} <= set(line)
            # A reload with a broken file keeps the running configuration.
            config.write_text(config.read_text() + "[bogus]\n")
            proc.proc.send_signal(signal.SIGHUP)
            await systemd.until("RELOADING=1")
            await systemd.until("READY=1")
            async with session.get(f"{proc.url}/renamed/noarch/repodata.json") as resp:
                assert resp.status == 200
        assert proc.stop() == 0
        await systemd.until("STOPPING=1")
    finally:
        proc.kill()
        systemd.close()
    log = proc.log.read_text()
    assert "reloaded" in log and "unknown section" in log and "Traceback" not in log
    assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in systemd.messages)


def test_notifier_is_silent_without_a_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    from condaproxy.ops.notify import Notifier, watchdog_interval

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    notifier = Notifier()
    assert not notifier.enabled
    notifier.send("READY=1")  # a no-op
    assert watchdog_interval() is None  # the pings are for another process
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 1.0


def test_abstract_notify_socket() -> None:
    from condaproxy.ops.notify import Notifier

    name = f"condaproxy-test-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    try:
        notifier = Notifier("@" + name)
        notifier.send("READY=1", "STATUS=a\nb")
        receiver.settimeout(5)
        assert receiver.recv(100) == b"READY=1\nSTATUS=a b"
        notifier.close()
    finally:
        receiver.close()


