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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import psutil
from aiohttp import web
from multidict import CIMultiDict

from condaproxy.app import DEFAULT_PARTS, Parts, create_app, server_options
from condaproxy.cache.cpu import CpuHook
from condaproxy.config.model import CacheConfig, ChannelConfig, Config, LazyConfig, UpstreamConfig
from condaproxy.http.services import SERVICES, Services


def make_config(
    cache_dir: Path, upstream_url: str, *, trusted: Mapping[str, Sequence[str]] | None = None, **cache: Any
) -> Config:
    """A config whose unlisted channels map to the fake upstream, with a private cache dir.

    trusted: channel name -> the origins its metadata may name although they are not public
    https hosts (trusted_origins); each such channel gets a section of its own.
    """
    upstream = UpstreamConfig(default=upstream_url, connect_timeout=5.0, read_timeout=5.0)
    channels = {
        name: ChannelConfig(name, f"{upstream_url}/{name}", 5.0, 5.0, trusted_origins=tuple(origins))
        for name, origins in (trusted or {}).items()
    }
    return Config(
        LazyConfig(streamer_interface=("127.0.0.1",)),
        replace(CacheConfig(directory=cache_dir), **cache),
        upstream,
        channels,
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

    def __init__(
        self,
        config: Config,
        *,
        handler_cancellation: bool = False,
        client_timeout: float | None = None,
        parts: Parts = DEFAULT_PARTS,
        clock: Callable[[], float] | None = None,
        cpu_hook: CpuHook | None = None,
    ) -> None:
        self.config = config
        options: dict[str, Any] = {"parts": parts, "cpu_hook": cpu_hook}
        if client_timeout is not None:
            options["client_timeout"] = client_timeout
        if clock is not None:
            options["clock"] = clock
        self.app = create_app(config, **options)
        self._runner = web.AppRunner(self.app, handler_cancellation=handler_cancellation, **server_options())
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
        """Wait until no download is in flight (persisted or dropped) and its temp file is gone."""
        deadline = time.monotonic() + timeout
        while len(self.services.inflight) or self.services.inflight.removing:
            if time.monotonic() > deadline:
                raise TimeoutError(f"downloads still in flight: {self.services.inflight._downloads}")
            await asyncio.sleep(0.02)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProxyProcess:
    """`python -m condaproxy serve --config FILE` as a real child process.

    ``argv`` replaces the command (e.g. a launcher that installs an audit hook first); ``env``
    is added to the environment; ``preexec_fn`` runs in the child before it starts (resource
    limits, say).
    """

    def __init__(
        self,
        config_file: Path,
        port: int,
        *,
        argv: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.config_file = config_file
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config_file.with_suffix(".log")
        self.argv = list(argv or [sys.executable, "-m", "condaproxy", "serve", "--config", str(config_file)])
        self.env = {**os.environ, **(env or {})}
        self.preexec_fn = preexec_fn

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        """The child's resident set size in bytes."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def peak_rss(self) -> int:
        """The child's peak resident set size in bytes so far (VmHWM: no sampling to miss it)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/PID/status")

    def open_fds(self) -> int:
        """File descriptors the child holds."""
        return int(psutil.Process(self.pid).num_fds())

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 20.0) -> ProxyProcess:
        """Start and wait until /healthz answers."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, preexec_fn=self.preexec_fn
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


def write_config(
    path: Path,
    cache_dir: Path,
    upstream_url: str,
    port: int,
    *,
    lazy: Mapping[str, str] | None = None,
    **extra: str,
) -> Path:
    """An INI file for a subprocess proxy bound to 127.0.0.1:port; extra keys go to [cache]."""
    lines = [
        "[lazy]",
        f"streamer_port = {port}",
        "streamer_interface = 127.0.0.1",
        *(f"{k} = {v}" for k, v in (lazy or {}).items()),
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

    Every complete row has a blob of its size and sha256; nothing else is in the store (no
    unreferenced blob, no half-made copy); no pending put is left; no temp file outlives its
    download; the SQLite file itself is sound.
    """
    db = sqlite3.connect(cache_dir / "catalog.sqlite3")
    try:
        rows = db.execute("SELECT channel, subdir, filename, blob_key, sha256, size FROM units").fetchall()
        states = db.execute("SELECT DISTINCT state FROM units").fetchall()
        pending = db.execute("SELECT blob_key FROM pending").fetchall()
        integrity = db.execute("PRAGMA integrity_check").fetchall()
    finally:
        db.close()
    assert integrity == [("ok",)], f"catalog damaged: {integrity}"
    assert set(states) <= {("complete",)}, f"rows in other states: {states}"
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


class HealthProbe:
    """Polls /healthz back to back while a test runs; the loop's responsiveness, measured.

    ``async with HealthProbe(url) as probe: ...`` then ``probe.worst`` (seconds) and
    ``probe.count``. A probe that errors or times out counts as ``timeout`` seconds.
    """

    def __init__(self, url: str, *, interval: float = 0.02, timeout: float = 5.0) -> None:
        self.url = url + "/healthz"
        self.interval = interval
        self.timeout = timeout
        self.latencies: list[float] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def worst(self) -> float:
        """The slowest answer."""
        return max(self.latencies, default=0.0)

    @property
    def count(self) -> int:
        """How many probes answered."""
        return len(self.latencies)

    async def __aenter__(self) -> HealthProbe:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        # A connection of its own, kept alive: what is measured is the proxy's loop, not connects.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            while True:
                started = time.perf_counter()
                try:
                    async with session.get(self.url) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                took = time.perf_counter() - started
                self.latencies.append(took if ok else self.timeout)
                await asyncio.sleep(self.interval)


@dataclass
class RawAnswer:
    """One HTTP/1.1 response read off a raw socket, with how its body ended."""

    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes  # de-chunked
    complete: bool  # the framing (Content-Length or the last chunk) says the body is whole
    closed: bool  # the server closed the connection
    raw: bytes = field(repr=False, default=b"")


def parse_answer(data: bytes, closed: bool) -> RawAnswer:
    """Parse the first response in data (as far as it goes)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return RawAnswer(0, {}, b"", False, closed, data)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        want = int(headers["content-length"])
        return RawAnswer(status, headers, rest[:want], len(rest) >= want, closed, data)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size_line, sep, rest = rest.partition(b"\r\n")
            if not sep:
                return RawAnswer(status, headers, bytes(body), False, closed, data)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                return RawAnswer(status, headers, bytes(body), rest.startswith(b"\r\n"), closed, data)
            if len(rest) < size + 2:
                body += rest[:size]
                return RawAnswer(status, headers, bytes(body), False, closed, data)
            body += rest[:size]
            rest = rest[size + 2 :]
    # Neither: the body runs to the close, which is then its only (unverifiable) end.
    return RawAnswer(status, headers, rest, closed, closed, data)


async def raw_exchange(
    url: str, request: bytes, *, timeout: float = 15.0, read_until_close: bool = True
) -> RawAnswer:
    """Send request bytes as they are and read the answer until the server closes (or timeout)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = bytearray()
    closed = False
    try:
        writer.write(request)
        await writer.drain()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(1 << 16), left)
            except TimeoutError:
                break
            except ConnectionError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
            if not read_until_close and parse_answer(bytes(data), False).complete:
                break
    finally:
        writer.close()
    return parse_answer(bytes(data), closed)
