"""A partition busy with only ``s3_streaming=false`` traffic still completes every window's manifest.

Events of a project that is not exported used not to move their partition's watermark, and a busy
partition is never idle-ticked: while such a project streamed steadily, its partition wrote no
manifest parts and no window's manifest was complete (README: a manifest is "written when every
partition passed the window"). Their records now move the watermark by the record's time.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from streamapp.control import ProjectSettings, project_record, publish_records
from streamapp.partitioning import key_partition
from tests.helpers import every_partition_has_a_watermark, list_keys, wait_until

pytestmark = pytest.mark.integration

WINDOW, LATENESS, IDLE = 5, 2, 1


def test_a_window_gets_its_manifest_while_a_partition_carries_only_unexported_traffic(
    broker, s3_client, bucket, worker_env, start_worker
) -> None:
    """Events of an ``s3_streaming=false`` project do not move their partition's watermark, and a
    busy partition is never idle-ticked: while such a project streams steadily, its partition
    writes no manifest parts and no window's manifest is complete."""
    env = worker_env(window_seconds=WINDOW, allowed_lateness_seconds=LATENESS, idle_flush_seconds=IDLE)
    topic = env["STREAMAPP_EVENTS_TOPIC"]
    exported, unexported = (
        "shown",
        next(f"hidden-{i}" for i in range(100) if key_partition(f"hidden-{i}", 4) != key_partition("shown", 4)),
    )
    asyncio.run(
        publish_records(
            broker.bootstrap, f"{topic}-control", [project_record(ProjectSettings(unexported, s3_streaming=False))]
        )
    )
    worker = start_worker(env)

    # Not the startup race (tests/sink/test_manifest_idle_partitions.py): every partition ticked first.
    wait_until(lambda: every_partition_has_a_watermark(worker.web_url), 30, what="every partition ticked while idle")
    second = int(time.time())
    window = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(second // WINDOW * WINDOW))
    manifest = f"events/_manifests/{window}.json"
    deadline = time.monotonic() + WINDOW + LATENESS + IDLE + 15

    async def stream() -> bool:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        await producer.start()
        try:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(second))
            body = {"project_id": exported, "collection": "c", "event": {"n": 0, "keen": {"timestamp": stamp}}}
            await producer.send_and_wait(topic, orjson.dumps(body), key=exported.encode())
            n = 0
            while time.monotonic() < deadline:  # the unexported project never pauses for an idle flush
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
                body = {"project_id": unexported, "collection": "c", "event": {"n": n, "keen": {"timestamp": stamp}}}
                await producer.send_and_wait(topic, orjson.dumps(body), key=unexported.encode())
                n += 1
                if n % 10 == 0 and manifest in await asyncio.to_thread(
                    list_keys, s3_client, bucket, "events/_manifests/"
                ):
                    return True
                await asyncio.sleep(0.2)
            return False
        finally:
            await producer.stop()

    assert asyncio.run(stream()), f"no manifest {manifest} while an unexported project streams"
