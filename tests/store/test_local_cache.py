"""The local cache of a shared store: a size-bounded LRU of verified copies on the node's disk."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from s3 import MotoServer

from condaproxy.store.local_cache import LocalCachedStore
from condaproxy.store.s3 import S3Store
from condaproxy.store.s3_client import S3Settings


def blob(tmp_path: Path, size: int, seed: int) -> tuple[str, Path]:
    data = (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]
    path = tmp_path / f"src-{seed}"
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), path


@pytest.fixture
async def remote(moto: MotoServer, bucket: str):
    store = await S3Store(S3Settings(bucket=bucket, endpoint_url=moto.url, addressing_style="path")).open()
    yield store
    await store.close()


async def test_lru_keeps_the_hot_and_bounds_the_disk(remote: S3Store, tmp_path: Path) -> None:
    local = await LocalCachedStore(remote, tmp_path / "copies", 250_000).open()
    keys = []
    for seed in range(3):
        key, src = blob(tmp_path, 100_000, seed)
        await local.put(key, src)
        keys.append(key)
        if seed == 1:
            assert local.local_path(keys[0]) is not None  # a hit makes the first the most recent
    assert local.local_path(keys[1]) is None  # the least recently used went
    assert not (tmp_path / "copies" / keys[1][:2] / keys[1]).exists()
    assert local.local_path(keys[0]) is not None and local.local_path(keys[2]) is not None
    assert local.used == 200_000
    assert await remote.size(keys[1]) == 100_000  # the bucket keeps every object
    # A hit from the bucket brings a copy back, verified by its hash.
    local.keep_local(keys[1], 100_000)
    for _ in range(200):
        if local.local_path(keys[1]) is not None:
            break
        await asyncio.sleep(0.05)
    assert local.local_path(keys[1]) is not None
    # Reopened, the copies on disk are known again.
    again = await LocalCachedStore(remote, tmp_path / "copies", 250_000).open()
    assert again.used == local.used
    await local.delete(keys[1])
    assert local.local_path(keys[1]) is None and await remote.size(keys[1]) == 100_000
