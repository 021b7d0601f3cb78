"""``CheckpointStore`` (streamapp.sink.checkpoints): the one opener of a partition from the checkpoint
stored with its committed offset, shared by the real-time sink and the overflow drain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from faust.types import TP

from streamapp.sink import CheckpointStore
from streamapp.sink.layout import checkpoint_key


class FakeS3:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}

    async def get(self, bucket: str, key: str) -> bytes | None:
        return self.objects.get((bucket, key))

    async def put(self, bucket: str, key: str, body: Callable[[], bytes], content_type: str) -> None:
        assert content_type == "application/json"
        self.objects[(bucket, key)] = body()


class FakeConsumer:
    def __init__(self, committed: dict[TP, int]) -> None:
        self.committed = committed

    async def committed_offsets(self, tps: list[TP]) -> dict[TP, int]:
        return {tp: self.committed[tp] for tp in tps if tp in self.committed}


def store() -> tuple[CheckpointStore, FakeS3]:
    s3 = FakeS3()
    return CheckpointStore(s3, "bucket", "pre", "app"), s3  # type: ignore[arg-type]


def open_(checkpoints: CheckpointStore, committed: dict[TP, int], tp: TP) -> tuple[Any, Any]:
    return asyncio.run(checkpoints.open(FakeConsumer(committed), tp, tp.topic, lambda offset: {"missing_at": offset}))


def test_a_partition_never_committed_opens_without_a_checkpoint() -> None:
    checkpoints, _ = store()
    assert open_(checkpoints, {}, TP("events", 0)) == (None, None)


def test_the_checkpoint_saved_for_an_offset_is_the_one_opened_there() -> None:
    checkpoints, s3 = store()
    tp = TP("events", 3)
    asyncio.run(checkpoints.save("events", 3, 42, {"position": 42 << 20, "watermark": None}))
    assert ("bucket", checkpoint_key("pre", "app", "events", 3, 42)) in s3.objects
    assert open_(checkpoints, {tp: 42}, tp) == (42, {"position": 42 << 20, "watermark": None})
    # Another offset's checkpoint is not this one's.
    assert open_(checkpoints, {tp: 41}, tp) == (41, {"missing_at": 41})


def test_a_missing_checkpoint_is_logged_and_replaced(caplog: pytest.LogCaptureFixture) -> None:
    checkpoints, _ = store()
    tp = TP("events-overflow", 1)
    with caplog.at_level(logging.ERROR):
        committed, checkpoint = asyncio.run(
            checkpoints.open(FakeConsumer({tp: 7}), tp, tp.topic, lambda offset: {"offset": offset}, lane="drain: ")
        )
    assert (committed, checkpoint) == (7, {"offset": 7})
    assert "drain: no checkpoint for" in caplog.text
    assert orjson.dumps(checkpoint) == b'{"offset":7}'
