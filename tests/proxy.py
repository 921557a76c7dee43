"""Test helpers for the proxy itself: in-process and subprocess proxies, and the invariant check."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from condaproxy.app import create_app
from condaproxy.config import CacheConfig, Config, LazyConfig, UpstreamConfig
from condaproxy.services import SERVICES, Services


def make_config(cache_dir: Path, upstream_url: str, **cache: Any) -> Config:
    """A config whose unlisted channels map to the fake upstream, with a private cache dir."""
    return Config(
        LazyConfig(streamer_interface=("127.0.0.1",)),
        replace(CacheConfig(directory=cache_dir), **cache),
        UpstreamConfig(default=upstream_url, connect_timeout=5.0, read_timeout=5.0),
    )


@dataclass
class Response:
    """What a client received, read whole (or as far as it got)."""

    status: int
    headers: CIMultiDict[str]
    body: bytes
    error: BaseException | None = None

    @property
    def xcache(self) -> str | None:
        """The proxy's X-Cache verdict."""
        return self.headers.get("X-Cache")


class Proxy:
    """The proxy app served in this process on 127.0.0.1, on an ephemeral port."""

    def __init__(self, config: Config, *, handler_cancellation: bool = False) -> None:
        self.config = config
        self.app = create_app(config)
        self._runner = web.AppRunner(self.app, handler_cancellation=handler_cancellation)
        self._port = 0
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> Proxy:
        """Start serving."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self._port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        # No Accept-Encoding unless a test asks for one: bodies are compared byte for byte.
        self.session = aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=("Accept-Encoding",))
        return self

    async def close(self) -> None:
        """Stop serving and release everything (as at shutdown)."""
        if self.session is not None:
            await self.session.close()
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self._port}"

    @property
    def services(self) -> Services:
        """The running app's parts (catalog, inflight table, metrics...)."""
        return self.app[SERVICES]

    async def get(self, path: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> Response:
        """Request path and read the whole body; transport errors are returned, not raised."""
        assert self.session is not None
        async with self.session.request(method, self.url + path, headers=headers) as resp:
            body = bytearray()
            try:
                async for chunk in resp.content.iter_any():
                    body += chunk
            except aiohttp.ClientError as exc:
                return Response(resp.status, CIMultiDict(resp.headers), bytes(body), exc)
            return Response(resp.status, CIMultiDict(resp.headers), bytes(body))

    async def idle(self, timeout: float = 10.0) -> None:
        """Wait until no download is in flight (persisted or dropped)."""
        deadline = time.monotonic() + timeout
        while len(self.services.inflight):
            if time.monotonic() > deadline:
                raise TimeoutError(f"downloads still in flight: {self.services.inflight._downloads}")
            await asyncio.sleep(0.02)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProxyProcess:
    """`python -m condaproxy serve --config FILE` as a real child process."""

    def __init__(self, config_file: Path, port: int) -> None:
        self.config_file = config_file
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config_file.with_suffix(".log")

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 20.0) -> ProxyProcess:
        """Start and wait until /healthz answers."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "condaproxy", "serve", "--config", str(self.config_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"proxy exited {self.proc.returncode}: {self.log.read_text()}")
                try:
                    async with session.get(self.url + "/healthz") as resp:
                        if resp.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(self.log.read_text())
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        """kill -9: no cleanup of any kind runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def write_config(path: Path, cache_dir: Path, upstream_url: str, port: int, **extra: str) -> Path:
    """An INI file for a subprocess proxy bound to 127.0.0.1:port."""
    lines = [
        "[lazy]",
        f"streamer_port = {port}",
        "streamer_interface = 127.0.0.1",
        "[cache]",
        f"directory = {cache_dir}",
        *(f"{k} = {v}" for k, v in extra.items()),
        "[upstream]",
        f"default = {upstream_url}",
        "connect_timeout = 5",
        "read_timeout = 5",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def check_invariants(cache_dir: Path, *, allow_temp: bool = False) -> list[tuple[str, str, str]]:
    """Assert the store's invariants; returns the complete units as (channel, subdir, filename).

    Every complete row has a blob of its size and sha256; nothing else is in the store; no
    pending put is left; no temp file outlives its download.
    """
    db = sqlite3.connect(cache_dir / "catalog.sqlite3")
    try:
        rows = db.execute("SELECT channel, subdir, filename, blob_key, sha256, size FROM units").fetchall()
        pending = db.execute("SELECT blob_key FROM pending").fetchall()
    finally:
        db.close()
    blobs = cache_dir / "blobs"
    referenced = set()
    for channel, subdir, filename, blob_key, sha, size in rows:
        path = blobs / blob_key[:2] / blob_key
        assert path.is_file(), f"row {channel}/{subdir}/{filename} has no blob"
        data = path.read_bytes()
        assert len(data) == size, f"{filename}: blob is {len(data)} bytes, row says {size}"
        assert hashlib.sha256(data).hexdigest() == sha == blob_key, f"{filename}: sha256 mismatch"
        referenced.add(blob_key)
    stored = {p.name for p in blobs.glob("??/*")} if blobs.exists() else set()
    assert stored == referenced, f"unreferenced blobs in the store: {stored - referenced}"
    assert not pending, f"pending puts left: {pending}"
    if not allow_temp:
        temps = list((cache_dir / "tmp").iterdir()) if (cache_dir / "tmp").exists() else []
        assert not temps, f"temp files left: {temps}"
    return [(c, s, f) for c, s, f, *_ in rows]
