"""S3 writes that never give up: retries with exponential backoff and full jitter.

Except on a tenant's own destination (``tenant=True``): there an error that only the tenant
can fix (``streamapp.sink.s3_errors``) raises ``DestinationError`` at once, so the caller can
park the object instead of holding everybody's upload slots (``streamapp.sink.parking``).

boto3 is blocking, so calls run in a thread pool sized to the upload concurrency;
gzip runs there too (zlib releases the GIL), keeping the event loop free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from streamapp.settings import Settings
from streamapp.sink.s3_errors import DestinationError, ErrorKind, classify_exception

log = logging.getLogger(__name__)
T = TypeVar("T")
MULTIPART_THRESHOLD = 16 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024


@dataclass
class S3Stats:
    objects: int = 0
    bytes: int = 0
    retries: int = 0
    errors: int = 0
    last_error: str = ""
    last_write_at: float = 0.0
    put_seconds_total: float = 0.0


def make_client(settings: Settings, max_pool: int) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url or None,
        region_name=settings.s3_region,
        config=Config(
            retries={"max_attempts": 1},  # we retry ourselves, forever
            max_pool_connections=max_pool,
            connect_timeout=min(5.0, settings.s3_timeout_seconds),
            read_timeout=settings.s3_timeout_seconds,
            s3={"addressing_style": "path"},
        ),
    )


class S3Writer:
    def __init__(self, settings: Settings, threads: int | None = None) -> None:
        self.settings = settings
        workers = threads or max(2, settings.s3_upload_concurrency)
        self.client = make_client(settings, workers * 2)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3")
        self.stats = S3Stats()
        self.on_put: list[Callable[[float], None]] = []  # observers of put latency (metrics)

    async def _call(self, what: str, fn: Callable[[], T], *, tenant: bool = False) -> T:
        """Run ``fn`` in the pool until it succeeds; back off on any S3 or network error.

        ``tenant``: the call goes to a tenant's own destination; a tenant error raises
        ``DestinationError`` instead of being retried.
        """
        loop = asyncio.get_running_loop()
        delay = 0.1
        while True:
            try:
                return await loop.run_in_executor(self.pool, fn)
            except (ClientError, BotoCoreError, OSError) as exc:
                self.stats.errors += 1
                if tenant:
                    kind, reason = classify_exception(exc)
                    if kind is ErrorKind.TENANT:
                        self.stats.last_error = f"{what}: {reason}"[:500]
                        raise DestinationError(reason) from exc
                self.stats.retries += 1
                self.stats.last_error = f"{what}: {exc}"[:500]
                log.warning("S3 %s failed (%s); retrying in %.2fs", what, exc, delay)
                await asyncio.sleep(random.uniform(0, delay))  # full jitter
                delay = min(delay * 2, self.settings.s3_retry_max_seconds)

    async def put(
        self,
        bucket: str,
        key: str,
        make_body: Callable[[], bytes],
        content_type: str,
        *,
        tenant: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> int:
        """Write an object (body built in the pool); returns its size in bytes.

        ``tenant``: see ``_call`` (raises ``DestinationError``); ``metadata``: user metadata.
        """
        started = time.monotonic()
        body = await asyncio.get_running_loop().run_in_executor(self.pool, make_body)
        extra: dict[str, Any] = {"Metadata": metadata} if metadata else {}
        if len(body) >= MULTIPART_THRESHOLD:
            await self._multipart(bucket, key, body, content_type, tenant=tenant, extra=extra)
        else:
            await self._call(
                f"put {key}",
                lambda: self.client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type, **extra),
                tenant=tenant,
            )
        elapsed = time.monotonic() - started
        self.stats.objects += 1
        self.stats.bytes += len(body)
        self.stats.last_write_at = time.time()
        self.stats.put_seconds_total += elapsed
        for observer in self.on_put:
            observer(elapsed)
        return len(body)

    async def _multipart(
        self,
        bucket: str,
        key: str,
        body: bytes,
        content_type: str,
        *,
        tenant: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        upload = await self._call(
            f"create multipart {key}",
            lambda: self.client.create_multipart_upload(
                Bucket=bucket, Key=key, ContentType=content_type, **(extra or {})
            ),
            tenant=tenant,
        )
        upload_id = upload["UploadId"]
        try:
            await self._parts(bucket, key, body, upload_id, tenant)
        except DestinationError:
            # The destination went bad half-way: leave no incomplete upload behind (best effort).
            with contextlib.suppress(ClientError, BotoCoreError, OSError):
                await asyncio.get_running_loop().run_in_executor(
                    self.pool,
                    lambda: self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id),
                )
            raise

    async def _parts(self, bucket: str, key: str, body: bytes, upload_id: str, tenant: bool) -> None:

        async def part(number: int, start: int) -> dict[str, Any]:
            chunk = body[start : start + PART_SIZE]
            result = await self._call(
                f"upload part {number} of {key}",
                lambda: self.client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                ),
                tenant=tenant,
            )
            return {"PartNumber": number, "ETag": result["ETag"]}

        parts = await asyncio.gather(*(part(i + 1, start) for i, start in enumerate(range(0, len(body), PART_SIZE))))
        await self._call(
            f"complete multipart {key}",
            lambda: self.client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": list(parts)}
            ),
            tenant=tenant,
        )

    async def get(self, bucket: str, key: str) -> bytes | None:
        """An object's bytes, or None when there is no such key."""

        def fetch() -> bytes | None:
            try:
                return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise

        return await self._call(f"get {key}", fetch)

    async def list_keys(self, bucket: str, prefix: str) -> list[str]:
        def listing() -> list[str]:
            keys: list[str] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys.extend(item["Key"] for item in page.get("Contents", []))
            return keys

        return await self._call(f"list {prefix}", listing)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
