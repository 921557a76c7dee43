"""The S3 blob store (AWS, MinIO, Ceph RGW, R2...): one object per blob, <prefix>blobs/<2 hex>/<sha256>.

Object existence is the complete flag (DESIGN rule 9). An object is created only whole and
verified, and only if absent (`If-None-Match: *`): a single PUT carrying `ChecksumSHA256` (S3
checks it) for small blobs; for large ones a multipart upload from the verified temp file, a
few parts in flight at a time, whose bytes are hashed as they are read and compared with the
key before `CompleteMultipartUpload`. A 412 means another node stored the same bytes first.

The bucket is shared by every node: a node never deletes an object (another node's catalog
may point at it). Expiry and stray multipart parts are the bucket's lifecycle rules' job.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import math
import os
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from condaproxy.errors import BlobDamaged, StoreError, StoreUnavailable
from condaproxy.store.blobstore import check_key
from condaproxy.store.s3_client import (
    TRANSPORT_ERRORS,
    MiB,
    S3Settings,
    create_client,
    describe,
    status_of,
    unavailable,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

MIN_PART = 5 * MiB  # S3's smallest part but the last
MAX_PARTS = 10_000
READ_CHUNK = 256 * 1024
RESUMES = 2  # a GET broken midway is resumed from where it broke this many times
CONFLICT_ATTEMPTS = 3  # 409 ConditionalRequestConflict: a concurrent conditional write; try again
_CONTENT_RANGE = re.compile(r"bytes \d+-\d+/(\d+)")


def _read_and_hash(path: Path) -> tuple[bytes, str]:
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def _read_part(fd: int, offset: int, length: int, digest: Any) -> bytes:
    """One part of the file, added to the running digest (parts are read in order)."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise StoreError(f"temp file shrank while uploading (part at {offset})")
    digest.update(data)
    return data


class S3Store:
    """Blobs as objects in one bucket, shared by every node; open() before use."""

    shared = True

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self._stack = contextlib.AsyncExitStack()
        self._client: S3Client | None = None

    def __repr__(self) -> str:
        s = self.settings
        return f"<S3Store s3://{s.bucket}/{s.prefix} at {s.endpoint_url or 'AWS'}>"

    async def open(self) -> S3Store:
        """Create the client (no request is sent yet)."""
        self._client = await self._stack.enter_async_context(create_client(self.settings))
        return self

    @property
    def client(self) -> S3Client:
        if self._client is None:
            raise RuntimeError(f"{self!r} is not open")
        return self._client

    def object_key(self, key: str) -> str:
        """The object key of a blob: <prefix>blobs/<2 hex>/<sha256>."""
        check_key(key)
        return f"{self.settings.prefix}blobs/{key[:2]}/{key}"

    # -- writing -------------------------------------------------------------------------------

    async def put(self, key: str, src: Path) -> None:
        """Store src under key unless an object of that size is there already."""
        loop = asyncio.get_running_loop()
        size = await loop.run_in_executor(None, lambda: src.stat().st_size)
        if size <= self.settings.multipart_threshold:
            await self._put_single(key, src, size)
        else:
            await self._put_multipart(key, src, size)

    async def _put_single(self, key: str, src: Path, size: int) -> None:
        data, digest = await asyncio.get_running_loop().run_in_executor(None, _read_and_hash, src)
        if digest != key or len(data) != size:
            raise StoreError(f"temp file of {key} changed before upload (hashes to {digest[:12]}…)")
        checksum = base64.b64encode(bytes.fromhex(key)).decode()
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                await self.client.put_object(
                    Bucket=self.settings.bucket,
                    Key=self.object_key(key),
                    Body=data,
                    ContentLength=size,
                    ContentType="application/octet-stream",
                    ChecksumSHA256=checksum,  # S3 refuses the object unless the bytes match
                    IfNoneMatch="*",
                )
                return
            except ClientError as exc:
                status = status_of(exc)
                if status == 412:
                    if await self._already_there(key, size):
                        return
                    await self._overwrite(key, data, checksum)
                    return
                if status == 409 and attempt < CONFLICT_ATTEMPTS:
                    continue
                raise unavailable(f"PUT {key}", exc) from None
            except TRANSPORT_ERRORS as exc:
                raise unavailable(f"PUT {key}", exc) from None

    async def _already_there(self, key: str, size: int) -> bool:
        """After a 412: True when the existing object is ours (content-addressed, right size)."""
        have = await self.size(key)
        if have == size:
            log.debug("%s: already in the bucket (another node stored it)", key)
            return True
        log.warning("%s: the bucket holds %s bytes under this key, not %d; replacing it", key, have, size)
        return False

    async def _overwrite(self, key: str, data: bytes, checksum: str) -> None:
        # A damaged object (only a write outside condaproxy can make one): replaced whole.
        try:
            await self.client.put_object(
                Bucket=self.settings.bucket,
                Key=self.object_key(key),
                Body=data,
                ContentLength=len(data),
                ContentType="application/octet-stream",
                ChecksumSHA256=checksum,
            )
        except (ClientError, *TRANSPORT_ERRORS) as exc:
            raise unavailable(f"PUT {key}", exc) from None

    async def _put_multipart(self, key: str, src: Path, size: int) -> None:
        s = self.settings
        part_size = max(s.part_size, MIN_PART, math.ceil(size / MAX_PARTS))
        object_key = self.object_key(key)
        try:
            created = await self.client.create_multipart_upload(
                Bucket=s.bucket, Key=object_key, ContentType="application/octet-stream"
            )
        except (ClientError, *TRANSPORT_ERRORS) as exc:
            raise unavailable(f"multipart upload of {key}", exc) from None
        upload_id = created["UploadId"]
        try:
            parts = await self._upload_parts(key, upload_id, src, size, part_size)
            for attempt in range(1, CONFLICT_ATTEMPTS + 1):
                try:
                    await self.client.complete_multipart_upload(
                        Bucket=s.bucket,
                        Key=object_key,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},
                        IfNoneMatch="*",
                    )
                    return
                except ClientError as exc:
                    status = status_of(exc)
                    if status == 412 and await self._already_there(key, size):
                        await self._abort(key, upload_id)
                        return
                    if status == 409 and attempt < CONFLICT_ATTEMPTS:
                        continue
                    if status == 412:  # a damaged object is in the way: complete over it
                        await self.client.complete_multipart_upload(
                            Bucket=s.bucket,
                            Key=object_key,
                            UploadId=upload_id,
                            MultipartUpload={"Parts": parts},
                        )
                        return
                    raise
        except (ClientError, *TRANSPORT_ERRORS) as exc:
            await asyncio.shield(self._abort(key, upload_id))
            raise unavailable(f"multipart upload of {key}", exc) from None
        except BaseException:
            # Cancelled, or the bytes did not hash to the key: nothing may be completed.
            await asyncio.shield(self._abort(key, upload_id))
            raise

    async def _upload_parts(
        self, key: str, upload_id: str, src: Path, size: int, part_size: int
    ) -> list[CompletedPartTypeDef]:
        """Upload src in parts, at most part_concurrency in memory; check the whole sha256."""
        loop = asyncio.get_running_loop()
        digest = hashlib.sha256()
        slots = asyncio.Semaphore(self.settings.part_concurrency)
        etags: dict[int, str] = {}
        fd = await loop.run_in_executor(None, os.open, src, os.O_RDONLY)
        try:
            try:
                async with asyncio.TaskGroup() as group:
                    for number, offset in enumerate(range(0, size, part_size), start=1):
                        await slots.acquire()
                        length = min(part_size, size - offset)
                        try:
                            data = await loop.run_in_executor(None, _read_part, fd, offset, length, digest)
                        except BaseException:
                            slots.release()
                            raise
                        group.create_task(self._upload_part(key, upload_id, number, data, etags, slots))
            except BaseExceptionGroup as group_error:
                raise group_error.exceptions[0] from None
        finally:
            os.close(fd)
        if digest.hexdigest() != key:
            raise StoreError(f"temp file of {key} hashes to {digest.hexdigest()[:12]}…: not completed")
        return [{"ETag": etags[n], "PartNumber": n} for n in sorted(etags)]

    async def _upload_part(
        self,
        key: str,
        upload_id: str,
        number: int,
        data: bytes,
        etags: dict[int, str],
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            resp = await self.client.upload_part(
                Bucket=self.settings.bucket,
                Key=self.object_key(key),
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ContentLength=len(data),
            )
            etags[number] = resp["ETag"]
        finally:
            slots.release()

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self.client.abort_multipart_upload(
                Bucket=self.settings.bucket, Key=self.object_key(key), UploadId=upload_id
            )
        except (ClientError, *TRANSPORT_ERRORS) as exc:
            # The bucket's AbortIncompleteMultipartUpload lifecycle rule removes the parts later.
            log.warning("could not abort the multipart upload of %s: %s", key, describe(exc))

    async def delete(self, key: str) -> None:
        """Nothing: other nodes may use the object (lifecycle rules expire objects)."""
        check_key(key)

    # -- reading -------------------------------------------------------------------------------

    async def size(self, key: str) -> int | None:
        """The object's size (HEAD), or None when it is absent."""
        try:
            head = await self.client.head_object(Bucket=self.settings.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if status_of(exc) == 404:
                return None
            raise unavailable(f"HEAD {key}", exc) from None
        except TRANSPORT_ERRORS as exc:
            raise unavailable(f"HEAD {key}", exc) from None
        return int(head["ContentLength"])

    def local_path(self, key: str) -> Path | None:
        """None: the blob is in the bucket, not on this node."""
        return None

    def keep_local(self, key: str, size: int) -> None:
        """Nothing to keep it in (see local_cache.LocalCachedStore)."""

    async def presign(self, key: str, ttl: int) -> str | None:
        """A presigned GET URL (bound to GET: HEAD with it fails), valid ttl seconds."""
        try:
            return await self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.settings.bucket, "Key": self.object_key(key)},
                ExpiresIn=ttl,
            )
        except (ClientError, *TRANSPORT_ERRORS) as exc:
            raise unavailable(f"presign {key}", exc) from None

    async def read(
        self, key: str, offset: int, count: int, *, size: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Stream count bytes from offset with ranged GETs; a GET broken midway is resumed."""
        end = offset + count
        position = offset
        resumes = 0
        while position < end:
            try:
                resp = await self.client.get_object(
                    Bucket=self.settings.bucket,
                    Key=self.object_key(key),
                    Range=f"bytes={position}-{end - 1}",
                )
            except ClientError as exc:
                if status_of(exc) in (404, 416):
                    raise BlobDamaged(f"blob {key} is missing or shorter than its row says") from None
                raise unavailable(f"GET {key}", exc) from None
            except TRANSPORT_ERRORS as exc:
                raise unavailable(f"GET {key}", exc) from None
            body = resp["Body"]
            try:  # the body is released whatever happens, also when the reader stops early
                total = _CONTENT_RANGE.fullmatch(resp.get("ContentRange", ""))
                if size is not None and total is not None and int(total.group(1)) != size:
                    raise BlobDamaged(f"blob {key} is {total.group(1)} bytes, its row says {size}")
                try:
                    while position < end:
                        chunk = await body.read(min(READ_CHUNK, end - position))
                        if not chunk:
                            break
                        position += len(chunk)
                        yield chunk
                except TRANSPORT_ERRORS as exc:
                    resumes += 1
                    if resumes > RESUMES:
                        raise unavailable(f"GET {key}", exc) from None
                    log.info("GET %s broke at byte %d (%s); resuming", key, position, describe(exc))
                    continue
                if position < end:
                    resumes += 1
                    if resumes > RESUMES:
                        raise StoreUnavailable(f"S3 GET {key}: body ended at byte {position} of {end}")
            finally:
                body.close()

    async def keys(self) -> AsyncIterator[str]:
        """Every blob key in the bucket under the prefix (paged listing)."""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(
                Bucket=self.settings.bucket, Prefix=f"{self.settings.prefix}blobs/"
            ):
                for item in page.get("Contents", []):
                    name = item.get("Key", "").rsplit("/", 1)[-1]
                    with contextlib.suppress(ValueError):
                        yield check_key(name)
        except (ClientError, *TRANSPORT_ERRORS) as exc:
            raise unavailable("LIST", exc) from None

    async def remove_partials(self) -> list[str]:
        """Nothing: S3 has no half-made objects (stray multipart parts are the lifecycle rule's)."""
        return []

    # -- operations ------------------------------------------------------------------------------

    async def check(self) -> str | None:
        """Is the bucket reachable and writable? None if so, else what failed, in words."""
        s = self.settings
        probe = f"{s.prefix}probe/{uuid.uuid4().hex}"
        step = "reach the bucket"
        try:
            await self.client.head_bucket(Bucket=s.bucket)
            step = "write to the bucket"
            await self.client.put_object(Bucket=s.bucket, Key=probe, Body=b"condaproxy write probe")
            step = "delete the write probe"
            await self.client.delete_object(Bucket=s.bucket, Key=probe)
        except (ClientError, *TRANSPORT_ERRORS) as exc:
            return f"cannot {step} s3://{s.bucket}/{s.prefix}: {describe(exc)}"
        return None

    async def close(self) -> None:
        """Close the client and its connections; safe to call twice."""
        self._client = None
        await self._stack.aclose()
