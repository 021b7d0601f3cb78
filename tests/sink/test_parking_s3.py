"""``Parking`` against the real moto S3 server, without a worker: both lanes (the sink's objects
and the drain's delayed objects), discovery by listing after a restart, redelivery exactly once.

The worker end to end (Kafka, commits, the neighbour's bound) is tests/sink/test_parking_integration.py;
here the collaborators of ``Parking`` are stand-ins; its producer records the notices it would produce.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from faust.types import TP

from streamapp.dev import AWS_DUMMY_ENV
from streamapp.overflow.chunks import DelayedObject
from streamapp.settings import Settings
from streamapp.sink.layout import gzip_lines
from streamapp.sink.parking import Parking
from streamapp.sink.s3 import S3Writer
from tests.helpers import list_keys

pytestmark = pytest.mark.integration


def make_parking(settings: Settings, assignment: set[TP], notices: list[tuple[bytes, dict[str, Any]]]) -> Parking:
    """A ``Parking`` with just what it uses: a consumer's assignment, a producer, S3, spawn."""

    async def send(topic: str, key: bytes, value: bytes, *args: object) -> None:
        notices.append((key, orjson.loads(value)))

    app = SimpleNamespace(consumer=SimpleNamespace(assignment=lambda: assignment), producer=SimpleNamespace(send=send))
    pending: list[Any] = []
    return Parking(
        app=app,  # type: ignore[arg-type]
        settings=settings,
        s3=S3Writer(settings),
        objects_topic="objects",
        spawn=lambda aw: pending.append(asyncio.ensure_future(aw)),
    )


@pytest.fixture
def settings(s3: Any, bucket: str, unique_name: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    for name, value in AWS_DUMMY_ENV.items():  # the credentials a worker of the dev stack gets
        monkeypatch.setenv(name, value)
    yield Settings(
        s3_endpoint_url=s3.endpoint_url,
        s3_bucket=bucket,
        app_id=unique_name,
        events_topic=f"{unique_name}-events",
        s3_parked_retry_seconds=600,
        s3_retry_max_seconds=0.2,
    )


def delayed(bucket: str, n: int) -> DelayedObject:
    lines = bytearray(orjson.dumps({"keen": {"id": f"id{n}"}}) + b"\n")
    return DelayedObject(bucket, f"x/p/{n}-delayed.json.gz", lines, 1, len(lines), "p", "c", 1_000_000 + n)


def test_drain_objects_park_survive_a_restart_and_arrive_once(s3, s3_client, bucket, settings, unique_name) -> None:
    theirs = f"{unique_name}-theirs"  # missing until the end
    overflow = settings.topic_name("overflow")
    assignment = {TP(settings.events_topic, 1), TP(overflow, 1)}
    notices: list[tuple[bytes, dict[str, Any]]] = []

    async def park_two() -> Parking:
        parking = make_parking(settings, assignment, notices)
        first = await parking.put(overflow, 1, delayed(theirs, 1), "application/gzip")
        second = await parking.put(overflow, 1, delayed(theirs, 2), "application/gzip")
        assert first.parked_key and "NoSuchBucket" in first.reason
        assert second.parked_key and second.reason == first.reason  # straight to the quarantine
        # The service's own bucket is never parked: a project without a bucket of its own is written as ever.
        own = await parking.put(overflow, 1, delayed(bucket, 3), "application/gzip")
        assert own.parked_key is None
        assert parking.book.snapshot()["p"]["backlog_objects"] == 2
        await parking.step(0.0)  # due only after 600 s: nothing happens
        assert parking.book.snapshot()["p"]["redelivery_attempts"] == 0
        parking.s3.close()
        return parking

    first_life = asyncio.run(park_two())
    parked = sorted(list_keys(s3_client, bucket, f"events/_parked/{unique_name}/{overflow}/1/p/{theirs}/"))
    assert [k.rsplit("/", 1)[1] for k in parked] == ["1-delayed.json.gz", "2-delayed.json.gz"]
    assert first_life.book.objects_parked == 2

    async def restart_and_redeliver() -> Parking:
        parking = make_parking(settings, assignment, notices)  # a new worker: nothing in memory
        await parking.step(0.0)  # lists both lanes of partition 1, tries at once, bucket still missing
        state = parking.book.snapshot()["p"]
        assert state["backlog_objects"] == 2 and "NoSuchBucket" in state["reason"]
        assert state["redelivery_attempts"] == 1
        s3.create_bucket(theirs)
        assert parking.retry_now("p") == ["p"]
        await parking.step(0.0)
        await asyncio.sleep(0.1)  # let the notices' sends run
        parking.s3.close()
        parking.close()
        return parking

    second_life = asyncio.run(restart_and_redeliver())
    assert second_life.book.snapshot() == {} and second_life.book.objects_redelivered == 2
    assert list_keys(s3_client, bucket, "events/_parked/") == []
    assert sorted(list_keys(s3_client, theirs)) == ["x/p/1-delayed.json.gz", "x/p/2-delayed.json.gz"]
    for n in (1, 2):
        got = s3_client.get_object(Bucket=theirs, Key=f"x/p/{n}-delayed.json.gz")
        assert got["Body"].read() == gzip_lines(delayed(theirs, n).data)
    redelivered = sorted(v["key"] for _, v in notices if v.get("status") == "redelivered")
    assert redelivered == ["x/p/1-delayed.json.gz", "x/p/2-delayed.json.gz"]
    assert all(v["kind"] == "delayed" and v["events"] == 1 for _, v in notices)
