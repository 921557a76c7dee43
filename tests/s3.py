"""A real S3 endpoint for the tests: moto_server as its own process, a fault-injecting proxy in
front of it (moto neither checks checksums nor fails on demand), and config helpers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from aiobotocore.session import get_session
from aiohttp import web
from proxy import free_port

from condaproxy.config.model import CacheConfig, Config, LazyConfig, StoreConfig, UpstreamConfig

# Credentials for moto: any will do (its auth is off unless INITIAL_NO_AUTH_ACTION_COUNT is set).
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata endpoint
}


class MotoServer:
    """`python -m moto.server` on 127.0.0.1 and a free port, as a child process."""

    def __init__(self, log: Path, *, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log = log
        self.env = {**os.environ, **AWS_ENV, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> MotoServer:
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/moto-api/", timeout=1):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(self.log.read_text()) from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@asynccontextmanager
async def s3_client(endpoint: str) -> AsyncIterator[Any]:
    """A plain aiobotocore client for the tests' own checks."""
    async with get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ) as client:
        yield client


async def create_bucket(endpoint: str, name: str) -> str:
    async with s3_client(endpoint) as client:
        await client.create_bucket(Bucket=name)
    return name


async def object_keys(endpoint: str, bucket: str) -> list[str]:
    async with s3_client(endpoint) as client:
        resp = await client.list_objects_v2(Bucket=bucket)
        return sorted(item["Key"] for item in resp.get("Contents", []))


async def object_bytes(endpoint: str, bucket: str, key: str) -> bytes:
    async with s3_client(endpoint) as client:
        resp = await client.get_object(Bucket=bucket, Key=key)
        async with resp["Body"] as body:
            data: bytes = await body.read()
            return data


async def pending_uploads(endpoint: str, bucket: str) -> list[str]:
    async with s3_client(endpoint) as client:
        resp = await client.list_multipart_uploads(Bucket=bucket)
        return [u["Key"] for u in resp.get("Uploads", [])]


# -- the fault-injecting proxy -----------------------------------------------------------------


@dataclass
class Seen:
    """One request the fault proxy forwarded (or failed)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]

    @property
    def op(self) -> str:
        """A rough S3 operation name, enough for counting."""
        q = self.query
        if self.method == "POST" and "uploads" in q:
            return "CreateMultipartUpload"
        if self.method == "POST" and "uploadId" in q:
            return "CompleteMultipartUpload"
        if self.method == "PUT" and "partNumber" in q:
            return "UploadPart"
        if self.method == "DELETE" and "uploadId" in q:
            return "AbortMultipartUpload"
        return {"GET": "GetObject", "HEAD": "HeadObject", "PUT": "PutObject", "DELETE": "DeleteObject"}.get(
            self.method, self.method
        )


@dataclass
class Fault:
    """What to do to matching requests: status, stall, truncate or reset; `times` of them."""

    kind: str
    match: Callable[[Seen], bool]
    times: int | None = 1
    status: int = 500
    code: str = "InternalError"
    at: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)


_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


class S3FaultProxy:
    """Forwards every request to moto, recording it, with faults injected on demand."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.port = free_port()
        self.seen: list[Seen] = []
        self.faults: list[Fault] = []
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._session: aiohttp.ClientSession | None = None
        self._transports: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> S3FaultProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await self.up()
        return self

    async def up(self) -> None:
        """Listen (again): S3 is back."""
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    async def down(self) -> None:
        """S3 is down: connections are refused, and open ones are cut."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        for transport in list(self._transports):
            transport.abort()

    async def close(self) -> None:
        for fault in self.faults:
            fault.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def add(
        self, kind: str, match: Callable[[Seen], bool] | str, *, times: int | None = 1, **params: Any
    ) -> Fault:
        """Inject a fault into requests matching an op name (see Seen.op) or a predicate."""
        if isinstance(match, str):
            op = match
            match = lambda seen: seen.op == op  # noqa: E731
        fault = Fault(kind, match, times, **params)
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        for fault in self.faults:
            fault.release.set()
        self.faults.clear()

    def count(self, op: str | None = None) -> int:
        return sum(1 for s in self.seen if op is None or s.op == op)

    def _take(self, seen: Seen) -> Fault | None:
        for fault in self.faults:
            if (fault.times is None or fault.times > 0) and fault.match(seen):
                if fault.times is not None:
                    fault.times -= 1
                return fault
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        if request.transport is not None:
            self._transports.add(request.transport)
        seen = Seen(request.method, request.path, request.query_string, dict(request.headers))
        self.seen.append(seen)
        fault = self._take(seen)
        body = await request.read()
        if fault is not None and fault.kind == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        if fault is not None and fault.kind == "stall":
            await fault.release.wait()
        if fault is not None and fault.kind == "status":
            xml = f"<?xml version='1.0'?><Error><Code>{fault.code}</Code><Message>injected</Message></Error>"
            return web.Response(status=fault.status, text=xml, content_type="application/xml")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers["Host"] = request.host
        async with self._session.request(
            request.method, self.target + request.raw_path, headers=headers, data=body or None
        ) as upstream:
            data = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
            if fault is not None and fault.kind == "truncate" and request.method == "GET":
                resp = web.StreamResponse(status=upstream.status, headers=out)
                resp.content_length = len(data)
                await resp.prepare(request)
                await resp.write(data[: fault.at])
                assert request.transport is not None
                request.transport.abort()
                return resp
            if request.method == "HEAD":
                resp = web.StreamResponse(status=upstream.status, headers=out)
                if "Content-Length" in upstream.headers:
                    resp.content_length = int(upstream.headers["Content-Length"])
                await resp.prepare(request)
                await resp.write_eof()
                return resp
            return web.Response(status=upstream.status, headers=out, body=data)


# -- configurations ----------------------------------------------------------------------------


def s3_store_config(endpoint: str, bucket: str, **store: Any) -> StoreConfig:
    defaults: dict[str, Any] = {
        "backend": "s3",
        "bucket": bucket,
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "addressing_style": "path",
        "connect_timeout": 2.0,
        "read_timeout": 5.0,
        "persist_retry_max": 0.2,
    }
    return StoreConfig(**{**defaults, **store})


def s3_config(cache_dir: Path, upstream_url: str, store: StoreConfig, **cache: Any) -> Config:
    """An in-process proxy's config: the fake upstream, a private cache dir, blobs in S3."""
    return Config(
        LazyConfig(streamer_interface=("127.0.0.1",)),
        replace(CacheConfig(directory=cache_dir), **cache),
        UpstreamConfig(default=upstream_url, connect_timeout=5.0, read_timeout=5.0),
        store=store,
    )


def write_s3_config(
    path: Path, cache_dir: Path, upstream_url: str, port: int, endpoint: str, bucket: str, **store: str
) -> Path:
    """An INI file for a `condaproxy serve` node storing its blobs in the bucket."""
    values = {
        "backend": "s3",
        "bucket": bucket,
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "addressing_style": "path",
        **store,
    }
    lines = [
        "[lazy]",
        f"streamer_port = {port}",
        "streamer_interface = 127.0.0.1",
        "[cache]",
        f"directory = {cache_dir}",
        "[store]",
        *(f"{k} = {v}" for k, v in values.items()),
        "[upstream]",
        f"default = {upstream_url}",
        "connect_timeout = 5",
        "read_timeout = 5",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
