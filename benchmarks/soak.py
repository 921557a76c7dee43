#!/usr/bin/env python3
"""A bounded, self-stopping soak of condaproxy under a realistic, slightly hostile load.

For --duration seconds (default 600) a `condaproxy serve` child process takes, at once:

* real client installs: py-rattler solves and installs an environment through the proxy,
  again and again, alternating a warm channel with never-seen ones;
* hits: GETs (some ranged, some conditional, some HEAD) of cached packages and repodata;
* cold misses: packages of channels the proxy has never seen (each cold channel is the test
  channel under a new name, so its catalog rows, digests and fetches are all new), with a
  fault injected into `--abort-rate` (default 5%) of them: the upstream resets the connection
  part-way through the body.

Every body is checked against the channel's own bytes (sha256, or the exact slice for a
range). A body that ends cleanly but is wrong is a *bad body*; an answer that fails without
an injected fault to explain it is an *error*. The proxy's RSS and open file descriptors are
sampled every second. At the end the load stops, the proxy drains and stops (SIGTERM), and
the store's invariants are checked (every row's blob whole, nothing else stored, no temp file
left). The exit status is 1 for any bad body, error or broken invariant, 0 otherwise.

    .venv/bin/python benchmarks/soak.py                 # ten minutes
    .venv/bin/python benchmarks/soak.py --duration 120  # two

It uses the test suite's fake upstream and channel builder (tests/), so run it with the
project's test environment. Everything listens on 127.0.0.1 and stops on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from channel import Channel, PackageInfo, build_channel  # noqa: E402
from proxy import ProxyProcess, check_invariants, free_port, write_config  # noqa: E402
from upstream import FakeUpstream  # noqa: E402

WARM = "warm"
MAX_ERRORS_SHOWN = 20


@dataclass
class Result:
    """What a soak saw."""

    seconds: float = 0.0
    requests: Counter[str] = field(default_factory=Counter)
    bytes_checked: int = 0
    bad_bodies: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    injected: int = 0
    aborted_as_injected: int = 0
    installs: int = 0
    install_failures: list[str] = field(default_factory=list)
    cold_channels: int = 0
    rss: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    invariants: str = "not checked"

    @property
    def ok(self) -> bool:
        """No bad body, no unexplained error, a failed install or a broken invariant."""
        return not (self.bad_bodies or self.errors or self.install_failures) and self.invariants == "ok"

    def report(self) -> str:
        """A readable summary."""
        mib = 1 << 20
        total = sum(self.requests.values())
        lines = [
            f"soak: {self.seconds:.0f} s, {total} requests ({total / max(self.seconds, 1):.0f}/s), "
            f"{self.bytes_checked / mib:.0f} MiB of bodies sha256-checked",
            "  requests: " + ", ".join(f"{k} {v}" for k, v in sorted(self.requests.items())),
            f"  cold channels: {self.cold_channels}; installs: {self.installs} "
            f"({len(self.install_failures)} failed)",
            f"  injected upstream aborts: {self.injected}; client answers aborted by them: "
            f"{self.aborted_as_injected}",
            f"  bad bodies: {len(self.bad_bodies)}",
            f"  unexplained errors: {len(self.errors)}",
        ]
        if self.rss:
            lines.append(
                f"  proxy RSS: start {self.rss[0] / mib:.1f} MiB, end {self.rss[-1] / mib:.1f} MiB, "
                f"peak {max(self.rss) / mib:.1f} MiB, drift {(self.rss[-1] - self.rss[0]) / mib:+.1f} MiB"
            )
            lines.append(
                f"  proxy open fds: start {self.fds[0]}, end {self.fds[-1]}, peak {max(self.fds)}, "
                f"drift {self.fds[-1] - self.fds[0]:+d}"
            )
        lines.append(f"  invariants after shutdown: {self.invariants}")
        for what, items in (
            ("bad body", self.bad_bodies),
            ("error", self.errors),
            ("install", self.install_failures),
        ):
            lines += [f"  {what}: {item}" for item in items[:MAX_ERRORS_SHOWN]]
        lines.append("soak: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(lines)


async def solve_and_install(channel_url: str, prefix: Path, cache: Path) -> list[str]:
    """py-rattler: solve cp-extra for linux-64 through the proxy and install it."""
    import rattler

    gateway = rattler.Gateway(
        cache_dir=cache / "repodata", default_config=rattler.SourceConfig(sharded_enabled=True)
    )
    records = await rattler.solve(
        sources=[channel_url],
        specs=["cp-extra"],
        gateway=gateway,
        platforms=["linux-64", "noarch"],
        virtual_packages=[],
    )
    await rattler.install(records, target_prefix=prefix, cache_dir=cache / "pkgs", show_progress=False)
    return [json.loads(m.read_text())["fn"] for m in sorted((prefix / "conda-meta").glob("*.json"))]


class Load:
    """The mixed load against one proxy, and its bookkeeping."""

    def __init__(
        self,
        url: str,
        channel: Channel,
        upstream: FakeUpstream,
        result: Result,
        rng: random.Random,
        abort_rate: float,
    ) -> None:
        self.url = url
        self.channel = channel
        self.upstream = upstream
        self.result = result
        self.rng = rng
        self.abort_rate = abort_rate
        self.packages = sorted(channel.packages.values(), key=lambda p: p.filename)
        self.repodata = {
            f"{sub}/{name}": (channel.path / sub / name).read_bytes()
            for sub in channel.subdirs
            for name in ("repodata.json", "repodata.json.zst", "repodata_shards.msgpack.zst")
        }
        self.injected: dict[str, float] = {}  # upstream path -> when its fault was injected
        self.cold: list[tuple[str, list[PackageInfo]]] = []  # channels with packages not yet asked
        self.serial = 0
        self.stop = asyncio.Event()

    def new_cold_channel(self) -> tuple[str, list[PackageInfo]]:
        self.serial += 1
        name = f"cold{self.serial}"
        self.upstream.mount(name, self.channel.path)
        self.result.cold_channels += 1
        todo = list(self.packages)
        self.rng.shuffle(todo)
        return name, todo

    def explained(self, path: str) -> bool:
        when = self.injected.get(path)
        return when is not None and time.monotonic() - when < 30

    async def request(
        self,
        session: aiohttp.ClientSession,
        kind: str,
        path: str,
        expected: bytes,
        *,
        headers: dict[str, str] | None = None,
        method: str = "GET",
    ) -> None:
        self.result.requests[kind] += 1
        status = 0
        body = b""
        try:
            async with session.request(method, self.url + path, headers=headers) as resp:
                status = resp.status
                body = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            if self.explained(path):
                self.result.aborted_as_injected += 1
            else:
                self.result.errors.append(f"{kind} {path}: {type(exc).__name__}: {exc}")
            return
        want_status = 200
        if headers and "Range" in headers:
            first, _, last = headers["Range"].removeprefix("bytes=").partition("-")
            expected = expected[int(first) : int(last) + 1]
            want_status = 206
        if headers and "If-None-Match" in headers:
            want_status, expected = 304, b""
        if method == "HEAD":
            expected = b""
        if status != want_status:
            if status >= 500 and self.explained(path):
                self.result.aborted_as_injected += 1
            else:
                self.result.errors.append(
                    f"{kind} {path}: status {status} (wanted {want_status}): {body[:100]!r}"
                )
            return
        self.result.bytes_checked += len(body)
        if hashlib.sha256(body).digest() != hashlib.sha256(expected).digest():
            self.result.bad_bodies.append(f"{kind} {path}: {len(body)} bytes, wanted {len(expected)}")

    async def worker(self, session: aiohttp.ClientSession) -> None:
        rng = self.rng
        while not self.stop.is_set():
            roll = rng.random()
            if roll < 0.15:
                await self.cold_miss(session)
            elif roll < 0.30:
                name = rng.choice(sorted(self.repodata))
                data = self.repodata[name]
                if rng.random() < 0.3:
                    # The upstream's ETag, which the proxy passes on: a conditional hit is a 304.
                    etag = f'"{hashlib.sha256(data).hexdigest()[:32]}"'
                    await self.request(
                        session, "repodata-304", f"/{WARM}/{name}", data, headers={"If-None-Match": etag}
                    )
                else:
                    await self.request(session, "repodata", f"/{WARM}/{name}", data)
            else:
                pkg = rng.choice(self.packages)
                path = f"/{WARM}/{pkg.url_path}"
                data = pkg.read_bytes()
                choice = rng.random()
                if choice < 0.15:
                    start = rng.randrange(pkg.size)
                    end = min(pkg.size - 1, start + rng.randrange(1, 1 << 20))
                    await self.request(
                        session, "hit-range", path, data, headers={"Range": f"bytes={start}-{end}"}
                    )
                elif choice < 0.20:
                    await self.request(session, "hit-head", path, data, method="HEAD")
                else:
                    await self.request(session, "hit", path, data)

    async def cold_miss(self, session: aiohttp.ClientSession) -> None:
        if not self.cold or not self.cold[-1][1]:
            self.cold.append(self.new_cold_channel())
        name, todo = self.cold[-1]
        pkg = todo.pop()
        path = f"/{name}/{pkg.url_path}"
        if self.rng.random() < self.abort_rate:
            self.upstream.reset(path, self.rng.uniform(0.05, 0.95), times=1)
            self.injected[path] = time.monotonic()
            self.result.injected += 1
        await self.request(session, "cold", path, pkg.read_bytes())

    async def installer(self, workdir: Path) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            name = WARM if n % 2 else self.new_cold_channel()[0]
            where = workdir / f"install{n}"
            try:
                names = await solve_and_install(f"{self.url}/{name}", where / "env", where / "client")
                if not any(fn.startswith("cp-extra-") for fn in names):
                    self.result.install_failures.append(f"{name}: cp-extra not installed ({names})")
                self.result.installs += 1
            except Exception as exc:
                self.result.install_failures.append(f"{name}: {type(exc).__name__}: {exc}")
            finally:
                await asyncio.to_thread(shutil.rmtree, where, True)


async def wait_idle(url: str, timeout: float = 60.0) -> None:
    """Until the proxy reports no download in flight."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(url + "/metrics") as resp:
                text = await resp.text()
            if any(
                line.startswith("condaproxy_inflight ") and float(line.split()[1]) == 0
                for line in text.splitlines()
            ):
                return
            await asyncio.sleep(0.2)
    raise TimeoutError("downloads still in flight at the end of the soak")


async def soak(
    duration: float,
    workdir: Path,
    *,
    concurrency: int = 8,
    abort_rate: float = 0.05,
    seed: int = 1,
    installs: bool = True,
    channel: Channel | None = None,
    say: Callable[[str], None] = print,
) -> Result:
    """Run the soak for duration seconds in workdir (building the test channel unless given)."""
    result = Result()
    rng = random.Random(seed)
    if channel is None:
        say(f"soak: building the test channel in {workdir}")
        channel = build_channel(workdir / "channel")
    upstream = FakeUpstream()
    upstream.mount(WARM, channel.path)
    await upstream.start()
    port = free_port()
    cache = workdir / "cache"
    ini = write_config(workdir / "proxy.ini", cache, upstream.url, port)
    proc = await ProxyProcess(ini, port).start()
    try:
        load = Load(proc.url, channel, upstream, result, rng, abort_rate)
        process = psutil.Process(proc.pid)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout, skip_auto_headers=("Accept-Encoding",)) as session:
            # Warm up: the warm channel's repodata and packages cached, then start measuring.
            for name in load.repodata:
                await load.request(session, "warmup", f"/{WARM}/{name}", load.repodata[name])
            for pkg in load.packages:
                await load.request(session, "warmup", f"/{WARM}/{pkg.url_path}", pkg.read_bytes())
            await wait_idle(proc.url)
            result.rss.append(process.memory_info().rss)
            result.fds.append(process.num_fds())
            say(
                f"soak: load for {duration:.0f} s ({concurrency} clients, installs {'on' if installs else 'off'})"
            )
            started = time.monotonic()
            tasks = [asyncio.ensure_future(load.worker(session)) for _ in range(concurrency)]
            if installs:
                tasks.append(asyncio.ensure_future(load.installer(workdir)))
            next_report = started + 30
            while (now := time.monotonic()) - started < duration:
                await asyncio.sleep(1.0)
                result.rss.append(process.memory_info().rss)
                result.fds.append(process.num_fds())
                if now >= next_report:
                    next_report += 30
                    say(
                        f"soak: {now - started:4.0f} s, {sum(result.requests.values())} requests, "
                        f"rss {result.rss[-1] >> 20} MiB, fds {result.fds[-1]}, "
                        f"bad {len(result.bad_bodies)}, errors {len(result.errors)}"
                    )
                if any(t.done() and t.exception() for t in tasks):
                    break  # a worker crashed: stop and report rather than run on blind
            load.stop.set()
            await asyncio.gather(*tasks)
            for task in tasks:
                if task.exception():
                    result.errors.append(f"load task crashed: {task.exception()!r}")
            result.seconds = time.monotonic() - started
            await wait_idle(proc.url)
            result.rss.append(process.memory_info().rss)
            result.fds.append(process.num_fds())
    finally:
        code = proc.stop()
        await upstream.close()
    if code != 0:
        result.errors.append(f"the proxy exited {code} on SIGTERM")
    try:
        check_invariants(cache)
        result.invariants = "ok"
    except AssertionError as exc:
        result.invariants = f"BROKEN: {exc}"
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the soak from the command line; exit status 1 on any failure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default: 600)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent HTTP clients (default: 8)")
    parser.add_argument("--abort-rate", type=float, default=0.05, help="cold misses with an upstream abort")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-installs", action="store_true", help="skip the py-rattler installs")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="condaproxy-soak-"))
    try:
        result = asyncio.run(
            soak(
                args.duration,
                workdir,
                concurrency=args.concurrency,
                abort_rate=args.abort_rate,
                seed=args.seed,
                installs=not args.no_installs,
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(result.report())
    return 0 if result.ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
