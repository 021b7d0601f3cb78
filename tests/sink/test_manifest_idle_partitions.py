"""Manifests when some partitions never see an event.

A window's manifest is composed once every partition wrote its part (README: "written when every
partition passed the window"), and parts are written as a partition's watermark passes windows.
A partition that never got an event used to have no watermark, and no tick (it was never opened),
so no window's manifest was ever complete; a fresh deployment with fewer active project keys than
partitions got objects but no manifests. Assigned partitions are now ticked while idle.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.helpers import every_partition_has_a_watermark, list_keys, wait_until

pytestmark = pytest.mark.integration

WINDOW, LATENESS, IDLE = 5, 2, 1


def test_a_window_gets_its_manifest_when_some_partitions_never_saw_an_event(
    broker, s3_client, bucket, worker_env, start_worker
) -> None:
    env = worker_env(window_seconds=WINDOW, allowed_lateness_seconds=LATENESS, idle_flush_seconds=IDLE)
    worker = start_worker(env)

    # Idle partitions are ticked from their assignment on: a window that starts after that gets
    # a part from every partition. (A window that closed before a partition's first tick does not:
    # events produced before the worker was assigned its partitions may have no manifest.)
    wait_until(lambda: every_partition_has_a_watermark(worker.web_url), 30, what="every partition ticked while idle")
    second = int(time.time())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(second))
    window = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(second // WINDOW * WINDOW))

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        await producer.start()
        try:
            for n in range(5):  # one project: one partition of four
                body = {"project_id": "lonely", "collection": "c", "event": {"n": n, "keen": {"timestamp": stamp}}}
                await producer.send_and_wait(env["STREAMAPP_EVENTS_TOPIC"], orjson.dumps(body), key=b"lonely")
        finally:
            await producer.stop()

    asyncio.run(send())
    wait_until(lambda: list_keys(s3_client, bucket, "events/lonely/"), 40, what="lonely's object")
    manifest = f"events/_manifests/{window}.json"
    wait_until(
        lambda: manifest in list_keys(s3_client, bucket, "events/_manifests/"),
        WINDOW + LATENESS + IDLE + 15,
        what=f"the manifest of the window ({manifest})",
    )
