"""The S3 client's side of the S3 store: its settings, its botocore configuration, and the
translation of botocore's errors into the project's, in words an operator can act on."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

from condaproxy.errors import StoreUnavailable

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

MiB = 1 << 20
# Where transport failures surface: botocore's own errors, and aiohttp's while a body streams.
TRANSPORT_ERRORS = (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError)


@dataclass(frozen=True)
class S3Settings:
    """Where the bucket is and how to talk to it; credentials come from the AWS chain only."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    multipart_threshold: int = 16 * MiB  # larger blobs go up in parts
    part_size: int = 16 * MiB
    part_concurrency: int = 4  # parts in flight (and in memory) per upload
    max_connections: int = 64  # botocore's pool: above persist x parts + concurrent reads


def describe(exc: BaseException) -> str:
    """What went wrong, in words an operator can act on; never a credential."""
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return "no credentials (looked in the environment, the shared profile and the instance/pod role)"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and status == 404):
            return "no such bucket"
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            return f"access denied ({code or status})"
        return f"S3 answered {status} {code}".strip()
    if isinstance(exc, BotoCoreError):
        name = type(exc).__name__
        if "Endpoint" in name or "Connect" in name:
            return f"endpoint unreachable ({name})"
        return f"S3 request failed ({name})"
    if isinstance(exc, TimeoutError):
        return "S3 did not answer in time"
    return f"S3 request failed ({type(exc).__name__})"


def status_of(exc: ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def unavailable(what: str, exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"S3 {what}: {describe(exc)}")


def create_client(s: S3Settings) -> AbstractAsyncContextManager[S3Client]:
    """The aiobotocore S3 client for s; credentials come from the standard AWS chain only."""
    config = AioConfig(
        signature_version="s3v4",
        s3={"addressing_style": s.addressing_style},
        # botocore >= 1.36 adds CRC checksums to every request by default, which MinIO, Ceph
        # and other S3 lookalikes refuse: send checksums only where asked (ChecksumSHA256).
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=s.max_connections,
        connect_timeout=s.connect_timeout,
        read_timeout=s.read_timeout,
        # Our own layers retry (the persist backlog, resumed reads, the upstream fallback):
        # one quick retry here, not botocore's default five with backoff.
        retries={"total_max_attempts": 2, "mode": "standard"},
    )
    return get_session().create_client(
        "s3", region_name=s.region or "us-east-1", endpoint_url=s.endpoint_url, config=config
    )
