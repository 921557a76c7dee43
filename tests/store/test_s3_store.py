"""The S3 store against a real S3 endpoint (moto_server), faults injected by a proxy in front of it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from s3 import MotoServer, S3FaultProxy, object_bytes, object_keys, pending_uploads

from condaproxy.errors import BlobDamaged, StoreError, StoreUnavailable
from condaproxy.store.s3 import S3Store
from condaproxy.store.s3_client import S3Settings

MiB = 1 << 20


def blob(tmp_path: Path, size: int, seed: int = 0) -> tuple[str, Path, bytes]:
    data = (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]
    path = tmp_path / f"blob-{seed}-{size}"
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), path, data


@pytest.fixture
async def open_store(aws_env: dict[str, str]) -> AsyncIterator:
    stores: list[S3Store] = []

    async def make(endpoint: str, bucket: str, **settings: object) -> S3Store:
        values = {"prefix": "cp/", "endpoint_url": endpoint, "addressing_style": "path", **settings}
        store = await S3Store(S3Settings(bucket=bucket, **values)).open()  # type: ignore[arg-type]
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


async def read_all(store: S3Store, key: str, offset: int, count: int, size: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in store.read(key, offset, count, size=size)])


async def test_put_then_read_round_trip(
    open_store, s3faults: S3FaultProxy, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    store = await open_store(s3faults.url, bucket)
    key, path, data = blob(tmp_path, 300_000)
    assert await store.size(key) is None
    await store.put(key, path)
    # Content-addressed: the object key ends with the sha256 of its bytes.
    assert await object_keys(moto.url, bucket) == [f"cp/blobs/{key[:2]}/{key}"]
    assert (
        hashlib.sha256(await object_bytes(moto.url, bucket, f"cp/blobs/{key[:2]}/{key}")).hexdigest() == key
    )
    put = [s for s in s3faults.seen if s.op == "PutObject"]
    assert len(put) == 1
    headers = {k.lower(): v for k, v in put[0].headers.items()}
    assert headers["if-none-match"] == "*"
    assert headers["x-amz-checksum-sha256"] == base64.b64encode(bytes.fromhex(key)).decode()
    # when_required: botocore added no CRC checksum of its own (MinIO and Ceph refuse those).
    assert not any(h.startswith("x-amz-checksum-crc") for h in headers)
    assert await store.size(key) == len(data)
    assert await read_all(store, key, 0, len(data), size=len(data)) == data
    assert await read_all(store, key, 1000, 5000) == data[1000:6000]
    assert path.exists()  # src stays where it is


async def test_multipart_for_a_blob_larger_than_the_part_size(
    open_store, s3faults: S3FaultProxy, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    store = await open_store(
        s3faults.url, bucket, part_size=5 * MiB, multipart_threshold=5 * MiB, part_concurrency=2
    )
    key, path, data = blob(tmp_path, 12 * MiB + 17)
    await store.put(key, path)
    assert s3faults.count("CreateMultipartUpload") == 1
    assert s3faults.count("UploadPart") == 3
    complete = [s for s in s3faults.seen if s.op == "CompleteMultipartUpload"]
    assert len(complete) == 1 and complete[0].headers.get("If-None-Match") == "*"
    assert s3faults.count("PutObject") == 0
    assert await object_bytes(moto.url, bucket, f"cp/blobs/{key[:2]}/{key}") == data
    assert await pending_uploads(moto.url, bucket) == []


async def test_multipart_failure_aborts_and_leaves_nothing(
    open_store, s3faults: S3FaultProxy, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    store = await open_store(s3faults.url, bucket, part_size=5 * MiB, multipart_threshold=5 * MiB)
    key, path, _ = blob(tmp_path, 11 * MiB)
    s3faults.add("status", "UploadPart", times=None, status=503, code="SlowDown")
    with pytest.raises(StoreUnavailable):
        await store.put(key, path)
    assert s3faults.count("AbortMultipartUpload") == 1
    assert await object_keys(moto.url, bucket) == []
    assert await pending_uploads(moto.url, bucket) == []


async def test_bytes_that_do_not_hash_to_the_key_are_never_completed(
    open_store, s3faults: S3FaultProxy, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    store = await open_store(s3faults.url, bucket, part_size=5 * MiB, multipart_threshold=5 * MiB)
    _, small, _ = blob(tmp_path, 1000)
    _, large, _ = blob(tmp_path, 6 * MiB)
    wrong = "0" * 64
    with pytest.raises(StoreError):
        await store.put(wrong, small)
    with pytest.raises(StoreError):
        await store.put(wrong, large)
    assert s3faults.count("CompleteMultipartUpload") == 0
    assert s3faults.count("AbortMultipartUpload") == 1
    assert await object_keys(moto.url, bucket) == []
    assert await pending_uploads(moto.url, bucket) == []


@pytest.mark.parametrize("size", [200_000, 6 * MiB])
async def test_two_nodes_persist_the_same_bytes_at_once(
    open_store, s3faults: S3FaultProxy, moto: MotoServer, bucket: str, tmp_path: Path, size: int
) -> None:
    a = await open_store(s3faults.url, bucket, part_size=5 * MiB, multipart_threshold=5 * MiB)
    b = await open_store(s3faults.url, bucket, part_size=5 * MiB, multipart_threshold=5 * MiB)
    key, path, data = blob(tmp_path, size)
    await asyncio.gather(a.put(key, path), b.put(key, path))
    await b.put(key, path)  # and once more, when it is surely there: a 412, which is success
    assert await object_keys(moto.url, bucket) == [f"cp/blobs/{key[:2]}/{key}"]
    assert await object_bytes(moto.url, bucket, f"cp/blobs/{key[:2]}/{key}") == data
    assert await pending_uploads(moto.url, bucket) == []


async def test_a_damaged_object_under_the_key_is_replaced(
    open_store, s3faults: S3FaultProxy, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    store = await open_store(s3faults.url, bucket)
    key, path, data = blob(tmp_path, 5000)
    await store.client.put_object(Bucket=bucket, Key=store.object_key(key), Body=data[:100])
    with pytest.raises(BlobDamaged):
        await read_all(store, key, 0, len(data), size=len(data))
    await store.put(key, path)
    assert await store.size(key) == len(data)


async def test_conflict_409_is_tried_again(
    open_store, s3faults: S3FaultProxy, bucket: str, tmp_path: Path
) -> None:
    store = await open_store(s3faults.url, bucket)
    key, path, _ = blob(tmp_path, 5000)
    s3faults.add("status", "PutObject", status=409, code="ConditionalRequestConflict")
    await store.put(key, path)
    assert s3faults.count("PutObject") == 2
    assert await store.size(key) == 5000


async def test_reads_resume_after_truncation_and_reset(
    open_store, s3faults: S3FaultProxy, bucket: str, tmp_path: Path
) -> None:
    store = await open_store(s3faults.url, bucket)
    key, path, data = blob(tmp_path, 2 * MiB)
    await store.put(key, path)
    s3faults.add("truncate", "GetObject", at=300_000)
    assert await read_all(store, key, 0, len(data), size=len(data)) == data
    assert s3faults.count("GetObject") == 2  # the second asked only for what was missing
    assert s3faults.seen[-1].headers["Range"] == "bytes=300000-2097151"
    s3faults.add("truncate", "GetObject", at=10, times=None)
    with pytest.raises(StoreUnavailable):
        await read_all(store, key, 0, len(data))


async def test_read_failures_are_store_errors(
    open_store, s3faults: S3FaultProxy, bucket: str, tmp_path: Path
) -> None:
    store = await open_store(s3faults.url, bucket)
    key, path, data = blob(tmp_path, 5000)
    with pytest.raises(BlobDamaged):
        await read_all(store, key, 0, 10)  # missing
    await store.put(key, path)
    with pytest.raises(BlobDamaged):
        await read_all(store, key, 0, 10, size=4999)  # the row says another size
    s3faults.add("status", "GetObject", times=None, status=500)
    with pytest.raises(StoreUnavailable):
        await read_all(store, key, 0, 10)
    s3faults.clear()
    await s3faults.down()
    with pytest.raises(StoreUnavailable):
        await read_all(store, key, 0, 10)
    with pytest.raises(StoreUnavailable):
        await store.size(key)
    await s3faults.up()
    assert await read_all(store, key, 0, 10) == data[:10]


async def test_presigned_url_serves_the_object(
    open_store, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    store = await open_store(moto.url, bucket)
    key, path, data = blob(tmp_path, 70_000)
    await store.put(key, path)
    url = await store.presign(key, 60)
    assert url is not None and "X-Amz-Signature=" in url and "testing" not in url.split("Credential=")[0]
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        assert await resp.read() == data


async def test_check_says_what_failed(
    open_store, moto: MotoServer, bucket: str, s3faults: S3FaultProxy
) -> None:
    assert await (await open_store(moto.url, bucket)).check() is None
    missing = await (await open_store(moto.url, "no-such-bucket-here")).check()
    assert missing is not None and "no such bucket" in missing
    await s3faults.down()
    unreachable = await (await open_store(s3faults.url, bucket, connect_timeout=1.0)).check()
    assert unreachable is not None and "endpoint unreachable" in unreachable


async def test_check_without_credentials(
    open_store, moto: MotoServer, bucket: str, monkeypatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    problem = await (await open_store(moto.url, bucket)).check()
    assert problem is not None and "no credentials" in problem


async def test_check_with_bad_credentials(open_store, moto_with_auth: MotoServer) -> None:
    problem = await (await open_store(moto_with_auth.url, "any-bucket")).check()
    assert problem is not None and "access denied" in problem
    assert "testing" not in problem  # never a credential in a message
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in problem


async def test_connection_resets_are_retried(
    open_store, s3faults: S3FaultProxy, bucket: str, tmp_path: Path
) -> None:
    store = await open_store(s3faults.url, bucket)
    key, path, data = blob(tmp_path, 50_000)
    s3faults.add("reset", "PutObject")
    await store.put(key, path)
    assert s3faults.count("PutObject") == 2
    s3faults.add("reset", "GetObject")
    assert await read_all(store, key, 0, len(data)) == data
    s3faults.add("reset", "GetObject", times=None)
    with pytest.raises(StoreUnavailable):
        await read_all(store, key, 0, len(data))
