"""The overflow lane's own producer (streamapp.overflow.lane): its in-flight bound, that it is
built from Faust's producer settings, and a signed produce acknowledged by the real broker.

The end-to-end effect (the real-time path no longer stalls behind diversions) is checked by
tests/replay/test_replay.py; diversions and their drain by tests/overflow/test_drain.py and
tests/control/test_overflow_auth.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from streamapp.app import create_app
from streamapp.control import control_headers, verify_control
from streamapp.overflow.lane import InflightBudget, OverflowLane
from streamapp.settings import Settings


async def test_budget_holds_at_most_its_items_and_bytes_and_lets_a_big_item_through_alone() -> None:
    budget = InflightBudget(max_items=2, max_bytes=100)
    await budget.acquire(40)
    await budget.acquire(40)
    third = asyncio.ensure_future(budget.acquire(10))  # over the item bound
    await asyncio.sleep(0.01)
    assert not third.done()
    await budget.release(40)
    await asyncio.wait_for(third, 1)
    assert (budget.items, budget.bytes) == (2, 50)
    big = asyncio.ensure_future(budget.acquire(500))  # bigger than the whole byte bound
    await asyncio.sleep(0.01)
    assert not big.done(), "waits while anything else is in flight"
    await budget.release(40)
    await budget.release(10)
    await asyncio.wait_for(big, 1)
    assert (budget.items, budget.bytes) == (1, 500)
    small = asyncio.ensure_future(budget.acquire(1))
    await asyncio.sleep(0.01)
    assert not small.done(), "nothing joins an item over the byte bound"
    await budget.release(500)
    await asyncio.wait_for(small, 1)


def test_lane_producer_uses_faust_producer_settings() -> None:
    settings = Settings(control_secret="x", app_id="lane-conf", kafka_bootstrap="10.1.2.3:9093,10.1.2.4:9094")
    app = create_app(settings)
    app.conf.producer_compression_type = "gzip"  # whatever Faust's producer uses, the lane uses
    lane: OverflowLane = app.services.sink.overflow  # type: ignore[attr-defined]
    config = lane.producer_config()
    faust_config: Any = app.producer._settings_default()  # type: ignore[attr-defined]
    assert config["bootstrap_servers"] == faust_config["bootstrap_servers"]
    assert sorted(config["bootstrap_servers"]) == ["10.1.2.3:9093", "10.1.2.4:9094"]
    assert config["compression_type"] == "gzip"
    assert config["security_protocol"] == faust_config["security_protocol"]
    assert config["acks"] == "all"
    assert config["client_id"] == "lane-conf-overflow"
    assert "partitioner" not in config


async def test_lane_produces_a_signed_record_acknowledged_by_the_broker(broker: Any) -> None:
    settings = Settings(control_secret="s3cret", app_id="lane-e2e", kafka_bootstrap=broker.bootstrap)
    app = create_app(settings)
    lane: OverflowLane = app.services.sink.overflow  # type: ignore[attr-defined]
    topic, partition, key, value = "lane-e2e-overflow", 1, b"p1", b'{"events":[1,2,3]}'
    headers = control_headers(b"s3cret", topic, partition, key, value)
    await lane.start()
    try:
        await asyncio.wait_for(lane.produce(topic, key, value, partition, headers), 30)
        assert lane.produced == 1
        assert (lane.budget.items, lane.budget.bytes) == (0, 0)
    finally:
        await lane.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, partition)])
        records: list[Any] = []
        for _ in range(20):
            batch = await consumer.getmany(timeout_ms=500)
            records += [r for rs in batch.values() for r in rs]
            if records:
                break
    finally:
        await consumer.stop()
    assert [(r.key, r.value) for r in records] == [(key, value)]
    assert verify_control([b"s3cret"], topic, partition, key, value, records[0].headers) is None
