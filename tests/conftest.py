"""Shared fixtures: a real conda channel and a fake upstream serving it.

tests/ has no __init__.py, so pytest puts tests/ on sys.path (rootdir-relative
"prepend" import mode): helpers are imported as top-level ``channel`` and ``upstream``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from channel import Channel, build_channel
from proxy import Proxy, make_config
from s3 import AWS_ENV, MotoServer, S3FaultProxy, create_bucket
from upstream import FakeUpstream

from condaproxy.app import DEFAULT_PARTS, Parts
from condaproxy.cache.cpu import CpuHook

CHANNEL_PREFIX = "testchan"


@pytest.fixture(scope="session")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Channel:
    """The test channel, built once per session; treat its files as read-only."""
    return build_channel(tmp_path_factory.mktemp("channel"))


@pytest.fixture
async def upstream(channel: Channel) -> AsyncIterator[FakeUpstream]:
    """A started FakeUpstream serving ``channel`` at ``/testchan``."""
    server = FakeUpstream()
    server.mount(CHANNEL_PREFIX, channel.path)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def proxy_factory(
    upstream: FakeUpstream, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Proxy]]]:
    """Start in-process proxies in front of ``upstream``: ``await proxy_factory(**cache_keys)``.

    Keyword arguments override ``[cache]`` keys, or give ``trusted`` origins (see make_config);
    ``handler_cancellation`` picks aiohttp's mode (``run_app`` defaults to False, the test
    server to True: the proxy must be right in both); ``parts`` the catalog and store classes
    (gates.GATED to hold the proxy's own steps);
    ``cpu_hook`` is told of every CPU pool job.
    """
    started: list[Proxy] = []

    async def start(
        *,
        handler_cancellation: bool = False,
        cache_dir: Path | None = None,
        parts: Parts = DEFAULT_PARTS,
        cpu_hook: CpuHook | None = None,
        **cache: Any,
    ) -> Proxy:
        directory = cache_dir or tmp_path / f"cache{len(started)}"
        config = make_config(directory, upstream.url, **cache)
        proxy = Proxy(config, handler_cancellation=handler_cancellation, parts=parts, cpu_hook=cpu_hook)
        started.append(proxy)
        return await proxy.start()

    try:
        yield start
    finally:
        for proxy in reversed(started):
            await proxy.close()


@pytest.fixture
async def proxy(proxy_factory: Callable[..., Awaitable[Proxy]]) -> Proxy:
    """An in-process proxy with default settings in front of the fake upstream."""
    return await proxy_factory()


# -- a real S3 endpoint (moto_server, one process per session) --------------------------------


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto_server on 127.0.0.1, started once per session when a test asks for it."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A moto_server that checks credentials: the keys the tests use are unknown to it."""
    log = tmp_path_factory.mktemp("moto-auth") / "moto.log"
    server = MotoServer(log, env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Credentials in the environment (the standard AWS chain), as a deployment would have them."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    return AWS_ENV


_buckets = itertools.count()


@pytest.fixture
async def bucket(moto: MotoServer, aws_env: dict[str, str]) -> str:
    """A new, empty bucket of its own for each test."""
    return await create_bucket(moto.url, f"test-{os.getpid()}-{next(_buckets)}")


@pytest.fixture
async def s3faults(moto: MotoServer) -> AsyncIterator[S3FaultProxy]:
    """A fault-injecting proxy in front of moto; point endpoint_url at its url."""
    proxy = await S3FaultProxy(moto.url).start()
    try:
        yield proxy
    finally:
        await proxy.close()
