#!/usr/bin/env python3
"""condaproxy side by side with nginx ``proxy_cache``, in one bounded run.

Both proxies sit in front of the same local origin (an nginx static server, or an aiohttp
static server with ``--no-nginx``) serving a generated channel ``testchan`` whose
``repodata.json`` lists every package with its real sha256 and size (condaproxy caches only
packages it can verify). Both proxies run at once, each with an empty cache, and take turns
round by round (medians are reported), so a noisy machine disturbs both alike:

* cold miss of a big package: MB/s and time to first byte;
* warm hit of a big package: MB/s (sequential GETs on one keep-alive connection);
* warm small packages: requests/s with N concurrent keep-alive clients;
* 50 concurrent cold requests for one package: how many requests reached the origin,
  wall time, and the median time to first byte;
* RSS of the proxy process(es): idle after start, and peak over the run.

Results are printed as a table with the condaproxy/nginx ratio; timings are never asserted.
The exit status is 1 for correctness failures (wrong or short bodies, non-200 answers,
condaproxy making other than exactly one origin request for the collapsed file) or when
--timeout is reached, 2 for a setup problem (nginx missing, a server that does not start),
0 otherwise.

Everything listens on 127.0.0.1 only and every process started here is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

REPO = Path(__file__).resolve().parent.parent
NGINX_AGENT = "nginx-bench-proxy"  # the User-Agent nginx sends upstream
CONDAPROXY_AGENT = "condaproxy/"  # condaproxy's own User-Agent prefix
CHANNEL = "testchan"
SUBDIR = "linux-64"
MB = 1024 * 1024
READ = 1 << 20


class SetupError(Exception):
    """Something the benchmark needs is missing or did not start (exit status 2)."""


class Timeout(BaseException):
    """The run exceeded --timeout (a BaseException, so nothing swallows it)."""


# --------------------------------------------------------------------------------------------
# parameters


@dataclass(frozen=True)
class Sizes:
    big: int  # bytes of each big package (cold miss / warm hit)
    cold_rounds: int  # big packages, one cold miss each per proxy
    hit_rounds: int
    small: int  # bytes of each small package
    small_count: int
    clients: int  # concurrent clients for the small-file load
    duration: float  # seconds of small-file load per round
    load_rounds: int
    collapse: int  # bytes of the package asked for by many clients at once
    collapse_clients: int


def sizes_from(args: argparse.Namespace) -> Sizes:
    if args.quick:
        base = Sizes(4 * MB, 1, 2, 128 * 1024, 5, 8, 1.0, 1, 2 * MB, 50)
    else:
        base = Sizes(64 * MB, 3, 7, 1 * MB, 20, 16, 5.0, 2, 16 * MB, 50)
    return Sizes(
        big=int(args.big_mb * MB) if args.big_mb else base.big,
        cold_rounds=base.cold_rounds,
        hit_rounds=base.hit_rounds,
        small=base.small,
        small_count=base.small_count,
        clients=args.clients or base.clients,
        duration=args.duration or base.duration,
        load_rounds=base.load_rounds,
        collapse=int(args.collapse_mb * MB) if args.collapse_mb else base.collapse,
        collapse_clients=args.collapse_clients or base.collapse_clients,
    )


# --------------------------------------------------------------------------------------------
# the channel


@dataclass(frozen=True)
class Package:
    filename: str
    size: int
    sha256: str

    @property
    def path(self) -> str:
        return f"/{CHANNEL}/{SUBDIR}/{self.filename}"


@dataclass
class Channel:
    big: list[Package]  # one per cold round; big[0] is also the warm-hit file
    collapse: Package
    small: list[Package]


def _write_random(path: Path, size: int) -> Package:
    hasher = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MB))
            f.write(chunk)
            hasher.update(chunk)
            left -= len(chunk)
    return Package(path.name, size, hasher.hexdigest())


def _record(pkg: Package, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "version": "1.0",
        "build": "0",
        "build_number": 0,
        "depends": [],
        "sha256": pkg.sha256,
        "size": pkg.size,
        "subdir": SUBDIR,
    }


def make_channel(up: Path, sizes: Sizes) -> Channel:
    """Random package files plus repodata.json (linux-64 with digests, noarch empty)."""
    subdir = up / CHANNEL / SUBDIR
    subdir.mkdir(parents=True)
    (up / CHANNEL / "noarch").mkdir()
    names: dict[str, Package] = {}
    big = []
    for i in range(sizes.cold_rounds):
        pkg = _write_random(subdir / f"bench-big{i}-1.0-0.conda", sizes.big)
        names[f"bench-big{i}"] = pkg
        big.append(pkg)
    collapse = _write_random(subdir / "bench-collapse-1.0-0.conda", sizes.collapse)
    names["bench-collapse"] = collapse
    small = []
    for i in range(sizes.small_count):
        pkg = _write_random(subdir / f"bench-small{i:02d}-1.0-0.conda", sizes.small)
        names[f"bench-small{i:02d}"] = pkg
        small.append(pkg)
    for sd, packages in ((SUBDIR, names), ("noarch", {})):
        repodata = {
            "info": {"subdir": sd},
            "packages": {},
            "packages.conda": {pkg.filename: _record(pkg, name) for name, pkg in packages.items()},
            "repodata_version": 1,
        }
        (up / CHANNEL / sd / "repodata.json").write_text(json.dumps(repodata, indent=1))
    return Channel(big, collapse, small)


# --------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server process started here, in its own process group, always stopped by stop()."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.port = port
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,  # its own group: nginx workers are stopped with it
        )
        self.ps = psutil.Process(self.proc.pid)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, path: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SetupError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(f"HEAD {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
                    if s.recv(64).startswith(b"HTTP/"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise SetupError(f"{self.name} did not answer on port {self.port} within {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def processes(self) -> list[psutil.Process]:
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """SIGTERM the group, then SIGKILL whatever is left after a grace period."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=10)
            # The group may hold children (nginx workers) even after the leader exited.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        finally:
            self._log_file.close()


class RssSampler:
    """Samples the summed RSS of a server's processes; also reads VmHWM (Linux peak RSS)."""

    def __init__(self, server: Server, interval: float = 0.02) -> None:
        self.server = server
        self.interval = interval
        self.peak = 0
        self.idle = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def current(self) -> int:
        total = 0
        for p in self.server.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval)

    def high_water(self) -> int:
        total = 0
        for p in self.server.processes():
            try:
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
            except (OSError, ValueError):
                return 0
        return total

    def finish(self) -> int:
        """Stop sampling (call before stopping the server) and return the peak seen."""
        self.peak = max(self.peak, self.current(), self.high_water())
        self._stop.set()
        self._thread.join()
        return self.peak


# --------------------------------------------------------------------------------------------
# nginx


def find_nginx(explicit: str | None) -> str | None:
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _nginx_common(prefix: Path, workers: int) -> str:
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    # As root, workers would drop to "nobody", which cannot read our 0700 temp dirs.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return f"""{user}daemon off;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
"""


def _nginx_http_common(prefix: Path) -> str:
    return f"""
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
"""


def start_nginx_origin(nginx: str, tmp: Path, root: Path, workers: int) -> tuple[Server, Path]:
    prefix = tmp / "nginx-origin"
    prefix.mkdir()
    access = prefix / "access.log"
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(
        _nginx_common(prefix, workers)
        + "http {"
        + _nginx_http_common(prefix)
        + f"""
    log_format bench '$request_uri $status $http_user_agent';
    access_log {access} bench;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""
    )
    argv = [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    return Server("origin (nginx)", argv, port, prefix / "stderr.log"), access


def start_nginx_proxy(nginx: str, tmp: Path, origin_port: int, workers: int) -> Server:
    prefix = tmp / "nginx-proxy"
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(
        _nginx_common(prefix, workers)
        + "http {"
        + _nginx_http_common(prefix)
        + f"""
    access_log off;
    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=bench:16m max_size=20g inactive=1d
                     use_temp_path=off;
    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header User-Agent "{NGINX_AGENT}";
            proxy_cache bench;
            proxy_cache_key $uri;
            proxy_cache_valid 200 1d;
            proxy_cache_lock on;
            # The 5 s defaults would send waiters to the origin for any large file.
            proxy_cache_lock_timeout 60s;
            proxy_cache_lock_age 60s;
            add_header X-Cache $upstream_cache_status always;
        }}
    }}
}}
"""
    )
    argv = [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    return Server("nginx proxy_cache", argv, port, prefix / "stderr.log")


# --------------------------------------------------------------------------------------------
# aiohttp origin (used with --no-nginx), run as a subprocess of this script


def serve_origin(root: str, port: int, log: str) -> None:
    from aiohttp import web

    base = Path(root).resolve()
    log_file = open(log, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    async def handler(request: web.Request) -> web.StreamResponse:
        log_file.write(f"{request.path} - {request.headers.get('User-Agent', '-')}\n")
        path = (base / request.path.lstrip("/")).resolve()
        if base not in path.parents or not path.is_file():
            return web.Response(status=404)
        return web.FileResponse(path)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def start_aiohttp_origin(tmp: Path, root: Path) -> tuple[Server, Path]:
    prefix = tmp / "aiohttp-origin"
    prefix.mkdir()
    access = prefix / "access.log"
    access.touch()
    port = free_port()
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--serve-origin",
        str(root),
        str(port),
        str(access),
    ]
    return Server("origin (aiohttp)", argv, port, prefix / "stderr.log"), access


def origin_requests(access: Path, agent: str, path: str | None = None) -> int:
    """Requests the origin logged from one proxy (told apart by User-Agent), for one path or all."""
    count = 0
    for line in access.read_text().splitlines():
        uri, _, ua = [*line.split(" ", 2), "", ""][:3]
        if ua.startswith(agent) and (path is None or uri == path):
            count += 1
    return count


# --------------------------------------------------------------------------------------------
# condaproxy


def start_condaproxy(tmp: Path, origin_port: int) -> Server:
    prefix = tmp / "condaproxy"
    prefix.mkdir()
    port = free_port()
    ini = prefix / "condaproxy.ini"
    ini.write_text(
        f"""[lazy]
streamer_port = {port}
streamer_interface = 127.0.0.1

[cache]
directory = {prefix / "cache"}

[upstream]
default = http://127.0.0.1:{origin_port}
"""
    )
    # The access log is off for both proxies (nginx: access_log off).
    argv = [sys.executable, "-m", "condaproxy", "--log-level", "warning", "serve", "--config", str(ini)]
    return Server("condaproxy", argv, port, prefix / "stderr.log", cwd=REPO)


# --------------------------------------------------------------------------------------------
# clients


@dataclass
class Fetched:
    status: int
    xcache: str | None
    size: int
    sha256: str
    ttfb: float
    elapsed: float
    error: str | None = None


async def fetch(session: aiohttp.ClientSession, url: str) -> Fetched:
    """GET url whole; timings exclude hashing (the body is hashed after the clock stops)."""
    t0 = time.perf_counter()
    chunks: list[bytes] = []
    ttfb = 0.0
    try:
        async with session.get(url) as resp:
            async for chunk in resp.content.iter_any():
                if not chunks:
                    ttfb = time.perf_counter() - t0
                chunks.append(chunk)
            elapsed = time.perf_counter() - t0
            status, xcache = resp.status, resp.headers.get("X-Cache")
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Fetched(0, None, 0, "", 0.0, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
    hasher = hashlib.sha256()
    for chunk in chunks:
        hasher.update(chunk)
    return Fetched(status, xcache, sum(map(len, chunks)), hasher.hexdigest(), ttfb, elapsed)


def session(limit: int = 100) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=120),
    )


async def wait_hit(s: aiohttp.ClientSession, url: str, timeout: float = 15.0) -> bool:
    """Poll with HEAD until the proxy answers from its cache (X-Cache: HIT)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with s.head(url) as resp:
            if resp.headers.get("X-Cache") == "HIT":
                return True
        await asyncio.sleep(0.05)
    return False


async def _load(urls: list[str], size: int, conns: int, start_at: float, duration: float) -> dict[str, int]:
    ok = bad = 0
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=60),
    ) as s:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = time.perf_counter() + duration

        async def client(i: int) -> None:
            nonlocal ok, bad
            while time.perf_counter() < deadline:
                url = urls[i % len(urls)]
                i += 1
                try:
                    async with s.get(url) as resp:
                        n = 0
                        async for chunk in resp.content.iter_any():
                            n += len(chunk)
                        if resp.status == 200 and n == size:
                            ok += 1
                        else:
                            bad += 1
                except (TimeoutError, aiohttp.ClientError):
                    bad += 1

        await asyncio.gather(*(client(i * 7) for i in range(conns)))
    return {"ok": ok, "bad": bad}


def load_worker(urls: list[str], size: int, conns: int, start_at: float, duration: float) -> dict[str, int]:
    """One load-generating process (spawned): conns keep-alive clients looping over urls."""
    return asyncio.run(_load(urls, size, conns, start_at, duration))


# --------------------------------------------------------------------------------------------
# measurements: both proxies run at once and take turns, round by round, so that a noisy
# machine (other tenants, frequency scaling) disturbs both alike


@dataclass
class Proxy:
    server: Server
    probe: str
    agent: str  # User-Agent prefix of its requests in the origin's log
    samples: dict[str, list[float]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    sampler: RssSampler | None = None
    origin_before: int = 0

    @property
    def name(self) -> str:
        return self.server.name

    @property
    def url(self) -> str:
        return self.server.url

    def sample(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def check(self, what: str, got: Fetched, pkg: Package) -> bool:
        if got.error is not None:
            self.failures.append(f"{what}: {got.error}")
        elif got.status != 200:
            self.failures.append(f"{what}: status {got.status}")
        elif got.size != pkg.size or got.sha256 != pkg.sha256:
            self.failures.append(
                f"{what}: got {got.size} bytes sha256 {got.sha256[:12]}…, want {pkg.sha256[:12]}…"
            )
        else:
            return True
        return False


def turns(proxies: list[Proxy], rounds: int) -> Iterator[tuple[int, Proxy]]:
    """(round, proxy) pairs, the order of the proxies flipping every round."""
    for i in range(rounds):
        for proxy in proxies if i % 2 == 0 else reversed(proxies):
            yield i, proxy


async def measure_fetches(proxies: list[Proxy], chan: Channel, sizes: Sizes) -> None:
    # Cold miss: a different big package every round, so each fetch is a miss.
    async with session() as s:
        for i, p in turns(proxies, sizes.cold_rounds):
            pkg = chan.big[i]
            got = await fetch(s, p.url + pkg.path)
            if p.check(f"cold miss {pkg.filename}", got, pkg):
                p.sample("cold_mbps", got.size / MB / got.elapsed)
                p.sample("cold_ttfb_ms", got.ttfb * 1000)
            if i == 0:
                p.notes.append(f"cold X-Cache {got.xcache}")

    # Warm hit: the first big package again, on one keep-alive connection per proxy.
    async with session() as s:
        for p in proxies:
            if not await wait_hit(s, p.url + chan.big[0].path):
                p.failures.append("big package never became a cache HIT")
        for i, p in turns(proxies, sizes.hit_rounds):
            got = await fetch(s, p.url + chan.big[0].path)
            if p.check(f"warm hit #{i}", got, chan.big[0]):
                p.sample("hit_mbps", got.size / MB / got.elapsed)
            if i == 0:
                p.notes.append(f"hit X-Cache {got.xcache}")

        # Warm the small packages for the load test.
        for p in proxies:
            for pkg in chan.small:
                p.check(f"warm-up {pkg.filename}", await fetch(s, p.url + pkg.path), pkg)
            for pkg in chan.small:
                if not await wait_hit(s, p.url + pkg.path):
                    p.failures.append(f"{pkg.filename} never became a cache HIT")


async def measure_collapse(p: Proxy, chan: Channel, sizes: Sizes, access: Path) -> None:
    """Many clients ask one proxy, at once, for a package it has never fetched."""
    before = origin_requests(access, p.agent, chan.collapse.path)
    n = sizes.collapse_clients
    async with session(limit=0) as s:
        t0 = time.perf_counter()
        many = await asyncio.gather(*(fetch(s, p.url + chan.collapse.path) for _ in range(n)))
        wall = time.perf_counter() - t0
    ok = [got for i, got in enumerate(many) if p.check(f"collapsed client #{i}", got, chan.collapse)]
    await asyncio.sleep(0.3)  # nginx logs a request when it ends
    p.metrics["collapse_origin"] = origin_requests(access, p.agent, chan.collapse.path) - before
    p.metrics["collapse_ok"] = len(ok)
    p.metrics["collapse_wall_s"] = wall
    if ok:
        p.metrics["collapse_ttfb_ms"] = statistics.median(g.ttfb for g in ok) * 1000
    xc = Counter(g.xcache or "error" for g in many)
    p.notes.append("collapsed X-Cache " + ", ".join(f"{k}×{v}" for k, v in sorted(xc.items())))


def measure_load(p: Proxy, chan: Channel, sizes: Sizes, procs: int) -> None:
    """Warm small packages: requests/s of `clients` keep-alive clients in `procs` processes."""
    urls = [p.url + pkg.path for pkg in chan.small]
    per = [sizes.clients // procs + (1 if i < sizes.clients % procs else 0) for i in range(procs)]
    per = [c for c in per if c]
    start_at = time.time() + 1.5  # let the spawned processes import first
    pool = multiprocessing.get_context("spawn").Pool(len(per))
    try:
        outs = pool.starmap(load_worker, [(urls, sizes.small, c, start_at, sizes.duration) for c in per])
    finally:
        pool.terminate()
        pool.join()
    ok = sum(o["ok"] for o in outs)
    bad = sum(o["bad"] for o in outs)
    if bad:
        p.failures.append(f"small-file load: {bad} failed or short responses")
    p.sample("small_rps", ok / sizes.duration)
    p.sample("small_mbps", ok * sizes.small / MB / sizes.duration)


def run_all(proxies: list[Proxy], chan: Channel, sizes: Sizes, procs: int, access: Path) -> None:
    for p in proxies:
        p.server.wait_ready(p.probe)
    time.sleep(0.5)  # settle before reading idle RSS
    for p in proxies:
        p.origin_before = origin_requests(access, p.agent)  # readiness probes are not counted
        p.sampler = RssSampler(p.server)
    try:
        asyncio.run(measure_fetches(proxies, chan, sizes))
        for _, p in turns(proxies, sizes.load_rounds):
            measure_load(p, chan, sizes, procs)
        # Last: a burst of cold clients, one proxy at a time (both share the origin).
        for p in proxies:
            asyncio.run(measure_collapse(p, chan, sizes, access))
    finally:
        for p in proxies:
            for key, values in p.samples.items():
                p.metrics[key] = statistics.median(values)
            if p.sampler is not None:
                p.metrics["rss_peak_mb"] = p.sampler.finish() / MB
                p.metrics["rss_idle_mb"] = p.sampler.idle / MB
            p.metrics["origin_total"] = origin_requests(access, p.agent) - p.origin_before
            if p.server.proc.poll() is not None:
                p.failures.append(f"{p.name} exited with {p.server.proc.returncode}")


# --------------------------------------------------------------------------------------------
# report


ROWS = (
    # key, label, better ("higher"/"lower"/""), format
    ("cold_mbps", "cold miss, big package (MB/s)", "higher", "{:.0f}"),
    ("cold_ttfb_ms", "cold miss, time to first byte (ms)", "lower", "{:.1f}"),
    ("hit_mbps", "warm hit, big package (MB/s)", "higher", "{:.0f}"),
    ("small_rps", "warm small packages (requests/s)", "higher", "{:.0f}"),
    ("small_mbps", "warm small packages (MB/s)", "higher", "{:.0f}"),
    ("collapse_origin", "N cold clients, one file: origin requests", "lower", "{:.0f}"),
    ("collapse_ok", "N cold clients: complete, correct bodies", "higher", "{:.0f}"),
    ("collapse_ttfb_ms", "N cold clients: median time to first byte (ms)", "lower", "{:.1f}"),
    ("collapse_wall_s", "N cold clients: wall time until all done (s)", "lower", "{:.2f}"),
    ("origin_total", "origin requests, whole run", "lower", "{:.0f}"),
    ("rss_idle_mb", "RSS after start (MB)", "lower", "{:.1f}"),
    ("rss_peak_mb", "RSS peak (MB)", "lower", "{:.1f}"),
)


def report(proxies: list[Proxy], sizes: Sizes, procs: int, origin: str, workers: int) -> str:
    by = {p.name: p for p in proxies}
    cp = by.get("condaproxy")
    ng = by.get("nginx proxy_cache")
    out = [
        f"condaproxy vs nginx proxy_cache — {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__} (client and condaproxy)",
        f"origin: {origin}; nginx worker_processes {workers}; "
        f"{sizes.cold_rounds} × {sizes.big / MB:g} MB big (median of {sizes.cold_rounds} cold, "
        f"{sizes.hit_rounds} warm), {sizes.small_count} × {sizes.small / 1024:g} KB small "
        f"({sizes.clients} clients in {procs} process(es), {sizes.load_rounds} × {sizes.duration:g} s), "
        f"{sizes.collapse / MB:g} MB × {sizes.collapse_clients} cold clients",
        "",
    ]
    header = f"{'metric':<48} {'nginx':>10} {'condaproxy':>11} {'cp/nginx':>9}  better"
    out += [header, "-" * len(header)]
    for key, label, better, fmt in ROWS:
        label = label.replace("N cold", f"{sizes.collapse_clients} cold")
        n = ng.metrics.get(key) if ng else None
        c = cp.metrics.get(key) if cp else None
        ratio = f"{c / n:.2f}" if n and c is not None else "-"
        out.append(
            f"{label:<48} {fmt.format(n) if n is not None else '-':>10} "
            f"{fmt.format(c) if c is not None else '-':>11} {ratio:>9}  {better}"
        )
    out.append("")
    for p in proxies:
        out.append(f"{p.name}: " + "; ".join(p.notes))
    for p in proxies:
        shown = p.failures[:10]
        for failure in shown:
            out.append(f"FAILED {p.name}: {failure}")
        if len(p.failures) > len(shown):
            out.append(f"FAILED {p.name}: … and {len(p.failures) - len(shown)} more")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# main


@contextmanager
def bounded(seconds: int) -> Iterator[None]:
    """Raise Timeout after seconds, and turn SIGTERM/SIGINT into a clean exit, so finally blocks run."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise Timeout(f"benchmark exceeded --timeout {seconds}s")

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    # SIGINT too: a shell starting us in the background with "&" leaves it ignored.
    old = {sig: signal.signal(sig, on_term) for sig in (signal.SIGTERM, signal.SIGINT)}
    old[signal.SIGALRM] = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        for sig, handler in old.items():
            signal.signal(sig, handler)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark condaproxy side by side with nginx proxy_cache.")
    p.add_argument("--quick", action="store_true", help="small sizes, a few seconds (smoke test)")
    p.add_argument("--no-nginx", action="store_true", help="measure condaproxy only, with an aiohttp origin")
    p.add_argument("--nginx", metavar="PATH", help="nginx binary (default: found on PATH or in /usr/sbin)")
    p.add_argument("--nginx-workers", type=int, default=1, help="nginx worker_processes (default 1)")
    p.add_argument("--big-mb", type=float, help="size of the big package in MB (default 64, quick 4)")
    p.add_argument(
        "--collapse-mb", type=float, help="size of the collapsed package in MB (default 16, quick 2)"
    )
    p.add_argument("--clients", type=int, help="concurrent clients for the small-file load (default 16)")
    p.add_argument("--collapse-clients", type=int, help="concurrent cold clients for one file (default 50)")
    p.add_argument("--duration", type=float, help="seconds of small-file load (default 5, quick 1)")
    p.add_argument(
        "--load-procs",
        type=int,
        default=max(1, min(4, (os.cpu_count() or 2) - 1)),
        help="processes generating the small-file load (default: CPUs - 1, at most 4)",
    )
    p.add_argument("--timeout", type=int, default=600, help="hard limit for the whole run in seconds")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    p.add_argument("--serve-origin", nargs=3, metavar=("ROOT", "PORT", "LOG"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_origin:
        root, port, log = args.serve_origin
        serve_origin(root, int(port), log)
        return 0
    nginx = None if args.no_nginx else find_nginx(args.nginx)
    if not args.no_nginx and nginx is None:
        where = f"not executable: {args.nginx}" if args.nginx else "looked on PATH and in /usr/sbin"
        print(
            f"bench_vs_nginx: nginx is not installed ({where}).\n"
            "Install it (Debian: apt-get install -y nginx) or pass --nginx PATH,\n"
            "or run with --no-nginx to measure condaproxy alone.",
            file=sys.stderr,
        )
        return 2
    sizes = sizes_from(args)
    procs = max(1, min(args.load_procs, sizes.clients))
    tmp = Path(tempfile.mkdtemp(prefix="condaproxy-bench-"))
    servers: list[Server] = []
    proxies: list[Proxy] = []
    origin_name = "nginx static" if nginx else "aiohttp static"
    status = 0
    try:
        with bounded(args.timeout):
            t0 = time.monotonic()
            chan = make_channel(tmp / "up", sizes)
            probe = f"/{CHANNEL}/noarch/repodata.json"
            if nginx:
                origin, access = start_nginx_origin(nginx, tmp, tmp / "up", args.nginx_workers)
            else:
                origin, access = start_aiohttp_origin(tmp, tmp / "up")
            servers.append(origin)
            origin.wait_ready(probe)
            if nginx:
                server = start_nginx_proxy(nginx, tmp, origin.port, args.nginx_workers)
                servers.append(server)
                proxies.append(Proxy(server, probe, NGINX_AGENT))
            server = start_condaproxy(tmp, origin.port)
            servers.append(server)
            proxies.append(Proxy(server, "/healthz", CONDAPROXY_AGENT))
            try:
                run_all(proxies, chan, sizes, procs, access)
            finally:
                cp = proxies[-1]
                if cp.metrics.get("collapse_origin") not in (None, 1):
                    cp.failures.append(
                        f"{sizes.collapse_clients} concurrent cold requests made "
                        f"{cp.metrics['collapse_origin']:.0f} origin requests, expected exactly 1"
                    )
                print(report(proxies, sizes, procs, origin_name, args.nginx_workers))
                print(f"\ntotal {time.monotonic() - t0:.1f} s")
            if any(p.failures for p in proxies):
                status = 1
                for p in proxies:
                    if p.failures and p.server.tail():
                        print(f"\n--- last lines of {p.name}'s log ---\n{p.server.tail()}", file=sys.stderr)
    except SetupError as exc:
        print(f"bench_vs_nginx: {exc}", file=sys.stderr)
        status = 2
    except Timeout as exc:
        print(f"bench_vs_nginx: {exc}", file=sys.stderr)
        status = 1
    finally:
        for server in reversed(servers):
            server.stop()  # idempotent
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
