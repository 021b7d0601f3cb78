"""Checkpoints stored with committed offsets: how a partition is opened where it was left.

The real-time sink and the overflow drain both commit a partition's offset only after the
state to resume from is in S3, under ``checkpoint_key(..., offset)`` in the service's bucket.
Opening a partition (after a start or a rebalance) reads the committed offset and the
checkpoint stored with it; both lanes do it here, so they find and write checkpoints alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
from faust.types import TP

from streamapp.sink.layout import checkpoint_key
from streamapp.sink.s3 import S3Writer

log = logging.getLogger(__name__)

__all__ = ["CheckpointStore"]


class CheckpointStore:
    """Reads and writes one app's checkpoints under ``{prefix}/_checkpoints/{app_id}/`` of ``bucket``."""

    def __init__(self, s3: S3Writer, bucket: str, prefix: str, app_id: str) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix
        self.app_id = app_id

    def key(self, topic: str, partition: int, offset: int) -> str:
        return checkpoint_key(self.prefix, self.app_id, topic, partition, offset)

    async def open(
        self,
        consumer: Any,
        tp: TP,
        topic: str,
        missing: Callable[[int], dict[str, Any]],
        lane: str = "",
    ) -> tuple[int | None, dict[str, Any] | None]:
        """(committed offset, checkpoint stored with it) of ``tp``; (None or 0, None) before any commit.

        A committed offset without its checkpoint (deleted by hand, or written by an older
        version) is logged and replaced by ``missing(committed)``: the partition starts there.
        ``lane`` prefixes the log line ("drain: ").
        """
        committed = (await consumer.committed_offsets([tp])).get(tp)
        if not committed:
            return committed, None
        body = await self.s3.get(self.bucket, self.key(topic, tp.partition, committed))
        if body is None:
            log.error("%sno checkpoint for %s at committed offset %s: starting there without one", lane, tp, committed)
            return committed, missing(committed)
        return committed, orjson.loads(body)

    async def save(self, topic: str, partition: int, offset: int, checkpoint: dict[str, Any]) -> None:
        """Store ``checkpoint`` for ``offset`` (before that offset is committed)."""
        body = orjson.dumps(checkpoint)
        await self.s3.put(self.bucket, self.key(topic, partition, offset), lambda: body, "application/json")
