"""The operator's commands as a user runs them: `condaproxy stats`, `gc`, `invalidate` on a stopped
proxy's cache and, through the admin API, on a running one; `condaproxy prefetch` from a pixi.lock
(written by py-rattler), a conda-lock.yml, an @EXPLICIT file and an environment.yml."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import rattler
from channel import Channel
from proxy import Proxy, ProxyProcess, check_invariants, free_port, make_config, write_config
from upstream import FakeUpstream

from condaproxy.conda.lockfiles import Lockfile, parse

TOKEN = "an-admin-token-of-32-characters!"
CANON = "https://conda.anaconda.org"
COMMANDS = ("stats", "gc", "invalidate", "prefetch", "verify")


def condaproxy(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "condaproxy", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("condaproxy") and "Traceback" not in result.stderr, lines
    for word in words:
        assert word in lines[0]


def ini(tmp_path: Path, upstream: FakeUpstream, port: int, *, admin: bool, **cache: str) -> Path:
    path = write_config(tmp_path / "proxy.ini", tmp_path / "cache", upstream.url, port, **cache)
    if admin:
        (tmp_path / "admin.token").write_text(TOKEN + "\n")
        path.write_text(path.read_text() + f"[admin]\ntoken_file = {tmp_path / 'admin.token'}\n")
    return path


def validated(cache: Path) -> dict[str, float]:
    db = sqlite3.connect(cache / "catalog.sqlite3")
    try:
        rows = db.execute("SELECT subdir || '/' || filename, validated_at FROM units WHERE kind='repodata'")
        return dict(rows.fetchall())
    finally:
        db.close()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, tmp_path: Path) -> None:
    result = condaproxy(command, "--help", cwd=tmp_path)
    assert result.returncode == 0 and "usage: condaproxy " + command in result.stdout


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    one_line_error(condaproxy("invalidate", "No Such/Channel", cwd=tmp_path), "not a channel name")
    one_line_error(condaproxy("stats", "--nope", cwd=tmp_path), "--nope")
    config = tmp_path / "c.ini"
    config.write_text(f"[cache]\ndirectory = {tmp_path / 'empty'}\n")
    one_line_error(condaproxy("stats", "--config", str(config)), "no cache at")
    one_line_error(condaproxy("prefetch", "--config", str(config), str(tmp_path / "absent.lock")), "cannot read")
    (tmp_path / "x.yml").write_text("just: text\n")
    one_line_error(condaproxy("prefetch", "--config", str(config), str(tmp_path / "x.yml")), "not a pixi.lock")
    one_line_error(condaproxy("prefetch", "--jobs", "0", str(tmp_path / "x.yml")), "--jobs")


async def test_commands_on_a_stopped_proxys_cache(upstream: FakeUpstream, channel: Channel, tmp_path: Path) -> None:
    big, data = channel.by_name("cp-big"), channel.by_name("cp-data")
    proxy = await Proxy(make_config(tmp_path / "cache", upstream.url)).start()
    try:
        for path in ("/testchan/noarch/repodata.json", "/testchan/linux-64/repodata.json"):
            assert (await proxy.get(path)).status == 200
        for pkg in (data, big):  # data first: the least recently used
            assert (await proxy.get(f"/testchan/{pkg.url_path}")).status == 200
            await proxy.idle()
    finally:
        await proxy.close()
    # Room for cp-big and the catalog (max_size counts both), not for cp-data as well.
    config = ini(tmp_path, upstream, free_port(), admin=False, max_size=str(big.size + 1024 * 1024))
    cache = tmp_path / "cache"

    result = condaproxy("stats", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "testchan" in result.stdout and "no running proxy" in result.stdout
    report = json.loads(condaproxy("stats", "--json", "--config", str(config)).stdout)
    (row,) = report["channels"]
    assert row["channel"] == "testchan" and row["units"] >= 4 and report["running"] is False

    result = condaproxy("invalidate", "testchan/noarch", "--config", str(config))
    assert result.returncode == 0 and "marked stale" in result.stdout, result.stderr
    ages = validated(cache)
    assert ages["noarch/repodata.json"] == 0 and ages["linux-64/repodata.json"] > 0
    assert condaproxy("invalidate", "testchan", "--config", str(config)).returncode == 0
    assert validated(cache)["linux-64/repodata.json"] == 0

    dry = condaproxy("gc", "--dry-run", "--config", str(config))
    assert dry.returncode == 0 and "would evict" in dry.stdout, dry.stderr
    assert data.filename in {f for _, _, f in check_invariants(cache)}
    result = condaproxy("gc", "--config", str(config))
    assert result.returncode == 0 and "evicted" in result.stdout
    kept = {f for _, _, f in check_invariants(cache)}
    assert data.filename not in kept and big.filename in kept

    result = condaproxy("invalidate", f"testchan/{big.url_path}", "--config", str(config))
    assert result.returncode == 0 and "dropped" in result.stdout
    assert big.filename not in {f for _, _, f in check_invariants(cache)}


async def test_commands_go_through_a_running_proxy(upstream: FakeUpstream, channel: Channel, tmp_path: Path) -> None:
    port = free_port()
    config = ini(tmp_path, upstream, port, admin=True)
    proc = await ProxyProcess(config, port).start()
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.get(f"{proc.url}/testchan/noarch/repodata.json") as resp:
                    assert resp.status == 200
            result = await asyncio.to_thread(condaproxy, "invalidate", "testchan/noarch", "--config", str(config))
            # repodata.json, and its gzip-coded copy once that is made (aiohttp accepts gzip).
            assert result.returncode == 0 and "cached files marked stale" in result.stdout, result.stderr
            assert result.stdout.startswith(("testchan/noarch: 1 ", "testchan/noarch: 2 ")), result.stdout
            # The running proxy's own view changed at once: the next request revalidates.
            async with session.get(f"{proc.url}/testchan/noarch/repodata.json") as resp:
                assert resp.headers["X-Cache"] == "REVALIDATED"
        stats = await asyncio.to_thread(condaproxy, "stats", "--json", "--config", str(config))
        report = json.loads(stats.stdout)
        assert report["running"] is True and report["traffic"]["since_start"]["hits"] >= 1
        assert report["channels"][0]["traffic"]["since_start"]["requests"] == 3
        gc = await asyncio.to_thread(condaproxy, "gc", "--config", str(config))
        assert gc.returncode == 0 and "max_size is not set" in gc.stdout
        # Without the token the running proxy's cache is not touched behind its back.
        bare = write_config(tmp_path / "bare.ini", tmp_path / "cache", upstream.url, port)
        result = await asyncio.to_thread(condaproxy, "invalidate", "testchan", "--config", str(bare))
        one_line_error(result, "[admin] token_file")
    finally:
        assert proc.stop() == 0
    assert "POST /_admin/invalidate" in proc.log.read_text() and TOKEN not in proc.log.read_text()


async def write_pixi_lock(path: Path, proxy_url: str) -> list[rattler.RepoDataRecord]:
    """A real pixi.lock, written by py-rattler from a solve through the proxy, with canonical URLs."""
    records = await rattler.solve(
        sources=[f"{proxy_url}/testchan"],
        specs=["cp-app"],
        gateway=rattler.Gateway(cache_dir=path.parent / "solve-cache"),
        platforms=["linux-64", "noarch"],
        virtual_packages=[],
    )
    lock = rattler.LockFile([rattler.LockPlatform("linux-64")])
    lock.set_channels("default", [rattler.LockChannel(f"{CANON}/testchan/")])
    for record in records:
        lock.add_conda_package("default", rattler.LockPlatform("linux-64"), record)
    lock.to_path(path)
    path.write_text(path.read_text().replace(proxy_url, CANON))
    return list(records)


async def test_prefetch_lockfiles_through_the_proxy(upstream: FakeUpstream, channel: Channel, tmp_path: Path) -> None:
    port = free_port()
    config = ini(tmp_path, upstream, port, admin=True)
    proc = await ProxyProcess(config, port).start()
    try:
        pixi = tmp_path / "pixi.lock"
        records = await write_pixi_lock(pixi, proc.url)
        parsed = parse(pixi.read_text())
        assert isinstance(parsed, Lockfile) and parsed.format == "pixi.lock"
        # The same packages as py-rattler's own reading of the file.
        env = rattler.LockFile.from_path(pixi).environment("default")
        theirs = [p for platform in env.platforms() for p in env.packages(platform) or []]
        assert {str(p.location) for p in theirs} == {p.url for p in parsed.packages}
        assert all(p.sha256 for p in parsed.packages) and len(parsed.packages) == len(records)
        extra, big = channel.by_name("cp-extra"), channel.by_name("cp-big")
        conda_lock = tmp_path / "conda-lock.yml"
        conda_lock.write_text(
            "version: 1\nmetadata:\n  platforms: [linux-64]\n  channels: [{url: testchan}]\npackage:\n"
            f"- name: cp-extra\n  manager: conda\n  platform: linux-64\n  url: {CANON}/testchan/{extra.url_path}\n"
            f"  hash: {{md5: {'0' * 32}, sha256: {extra.sha256}}}\n"
            "- name: somewheel\n  manager: pip\n  platform: linux-64\n  url: https://files.example/x.whl\n  hash: {}\n"
        )
        explicit = tmp_path / "explicit.txt"
        explicit.write_text(f"# platform: linux-64\n@EXPLICIT\n{CANON}/testchan/{big.url_path}#sha256:{big.sha256}\n")
        upstream.reset_counts()
        first = await asyncio.to_thread(
            condaproxy, "prefetch", "--config", str(config), "--proxy", proc.url, "--pin",
            str(pixi), str(conda_lock), str(explicit),
        )
        assert first.returncode == 0, first.stdout + first.stderr
        total = len(records) + 2
        assert f"{total} packages: {total} fetched, 0 already cached, 0 failed" in first.stdout
        assert "coverage 100.0%" in first.stdout and "1 non-conda entries skipped" in first.stdout
        assert f"fetched {big.filename}" in first.stdout  # plain lines: stdout is not a terminal
        for record in records:
            assert upstream.count(f"/testchan/{record.subdir}/{record.file_name}") == 1
        again = await asyncio.to_thread(condaproxy, "prefetch", "--config", str(config), str(pixi), str(explicit))
        assert again.returncode == 0
        assert f"{len(records) + 1} packages: 0 fetched, {len(records) + 1} already cached" in again.stdout
        async with aiohttp.ClientSession() as session, session.get(f"{proc.url}/_status.json") as resp:
            pins = (await resp.json())["store"]["pins"]["runtime"]
        assert big.filename in pins and extra.filename in pins
        # A lock file whose sha256 does not match what the channel serves: failed, exit 1.
        bad = tmp_path / "bad.txt"
        bad.write_text(f"@EXPLICIT\n{CANON}/testchan/{big.url_path}#sha256:{'1' * 64}\n{CANON}/other-host/x\n")
        result = await asyncio.to_thread(condaproxy, "prefetch", "--config", str(config), str(bad))
        assert result.returncode == 1
        assert "2 failed" in result.stdout and "differs from the lock file" in result.stdout
    finally:
        assert proc.stop() == 0
    check_invariants(tmp_path / "cache")


async def test_prefetch_environment_yml_is_solved_against_the_proxy(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    port = free_port()
    config = ini(tmp_path, upstream, port, admin=False)
    proc = await ProxyProcess(config, port).start()
    try:
        env = tmp_path / "environment.yml"
        env.write_text("name: test\nchannels:\n  - testchan\ndependencies:\n  - cp-app\n  - pip:\n    - x\n")
        result = await asyncio.to_thread(
            condaproxy, "prefetch", "--config", str(config), "--platform", "linux-64", str(env)
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "5 packages: 5 fetched" in result.stdout
        assert upstream.count("/testchan/linux-64/repodata.json") + upstream.count(
            "/testchan/linux-64/repodata_shards.msgpack.zst"
        ) >= 1
    finally:
        assert proc.stop() == 0
    cached = {f for _, _, f in check_invariants(tmp_path / "cache")}
    assert channel.by_name("cp-tools").filename in cached


async def test_prefetch_shows_a_progress_bar_on_a_terminal(proxy: Proxy, channel: Channel, tmp_path: Path) -> None:
    import fcntl
    import os
    import pty
    import struct
    import termios

    pkgs = [channel.by_name(n) for n in ("cp-base", "cp-data")]
    explicit = tmp_path / "env.txt"
    explicit.write_text("@EXPLICIT\n" + "".join(f"{CANON}/testchan/{p.url_path}\n" for p in pkgs))
    config = tmp_path / "c.ini"
    config.write_text(f"[upstream]\ndefault = {proxy.config.upstream.default}\n")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal

    def run() -> int:
        argv = [sys.executable, "-m", "condaproxy", "prefetch", "--config", str(config), "--proxy", proxy.url, str(explicit)]
        with subprocess.Popen(argv, stdout=follower, stderr=follower) as child:
            return child.wait(120)

    try:
        status = await asyncio.to_thread(run)
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(leader)
    text = out.decode(errors="replace")
    assert status == 0, text
    assert "2/2" in text and "pkg" in text and "\r" in text  # tqdm redraws its bar in place
    assert "fetched cp-base" not in text  # no per-file lines on a terminal
    assert "2 packages: 2 fetched" in text
