"""Forged records in the overflow lane (issue #9 item 2): only what a worker diverted is delivered.

The overflow topic is written by the sink (a shed project's excess) and read by the drain, which
remembers per source partition the positions it has delivered and drops the ones below. A forged
overflow record claiming a huge source position would make every later genuine diversion of that
partition look like a duplicate (lost), and its events would be exported as the victim's. The sink
signs what it diverts (and the drain its ticks) like a control record; the drain reads past
anything unsigned. Real worker, real broker, real S3.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from streamapp.contract import TICK_KEY
from streamapp.sink import overflow_record
from tests.metering.test_meter_integration import (
    METER_ENV,
    PROJECTS,
    QUOTA,
    STEADY,
    Producer,
    event_counts,
    expected,
    exported,
    meter,
    wait_exported,
    wait_metering,
    wait_until,
)

pytestmark = pytest.mark.integration

PARTITIONS = 4


async def forge(bootstrap: str, topic: str) -> int:
    """Unsigned overflow records into every overflow partition: a diversion of p00 claiming a huge
    source position of every source partition (its event marked ``forged``), and a tick."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    sent = 0
    try:
        for partition in range(PARTITIONS):
            record = b'{"project_id":"p00","collection":"pageviews","event":{"n":-1,"forged":true}}'
            value = overflow_record(partition, 10**9, int(time.time() * 1000), record)
            await producer.send_and_wait(topic, value, key=b"p00", partition=partition)
            await producer.send_and_wait(topic, b'{"at":0}', key=TICK_KEY, partition=partition)
            sent += 2
    finally:
        await producer.stop()
    return sent


def test_forged_overflow_records_are_skipped_and_genuine_diversions_delivered(
    broker: Any, s3_client: Any, bucket: str, worker_env: Any, start_worker: Any
) -> None:
    env = worker_env(**METER_ENV)
    worker = start_worker(env)
    wait_metering([worker])
    topic = env["STREAMAPP_EVENTS_TOPIC"]
    forged = asyncio.run(forge(broker.bootstrap, f"{topic}-overflow"))

    spike_at, spike_len = 4.0, 5.0
    producer = Producer(
        broker.bootstrap,
        topic,
        rate=STEADY * len(PROJECTS),
        projects=PROJECTS,
        duration=spike_at + spike_len + 4,
        spikes=[("p00", 20 * QUOTA / STEADY, spike_at, spike_len)],
    ).start()
    wait_until(lambda: any(s["project_id"] == "p00" for s in meter(worker)["shed"]["shed"]), spike_at + 6, "p00 shed")
    sent = producer.join()

    want = expected(sent)
    wait_exported(s3_client, bucket, want, worker=worker)
    objects = exported(s3_client, bucket)
    # Exactly once, and nothing of the forged records (n = -1) was exported.
    assert event_counts(objects) == want
    delayed = sum(len(events) for key, events in objects.items() if key.endswith("-delayed.json.gz"))
    assert delayed > 0, "the spike was diverted and drained"
    drain = meter(worker)["drain"]
    assert sum(p["forged_skipped"] for p in drain["partitions"].values()) == forged
    assert worker.is_running()
