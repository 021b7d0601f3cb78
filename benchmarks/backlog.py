"""Backlogs for the benchmarks: records under the event contract, produced before a run."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streamapp.contract import encode_record


def fill(
    bootstrap: str,
    topic: str,
    partitions: int,
    records: int,
    per_record: int,
    project_for: Callable[[int], str],
    timestamp_for: Callable[[int], str] | None = None,
    record_time_ms: Callable[[int], int] | None = None,
) -> int:
    """Create ``topic`` and produce ``records`` records of ``per_record`` events; returns the events.

    Record ``i`` belongs to ``project_for(i)``; its events get ``keen.timestamp = timestamp_for(i)``
    when given (else the sink stamps them with the record's time), and the record the Kafka
    timestamp ``record_time_ms(i)`` when given (else the time it is produced).
    """

    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20, max_request_size=4 << 20, acks=1
        )
        await producer.start()
        try:
            pending: list[Any] = []
            for i in range(records):
                project = project_for(i)
                events: list[dict[str, Any]] = [
                    {"n": i * per_record + j, "page": "/index.html", "user": {"id": i % 997}} for j in range(per_record)
                ]
                if timestamp_for is not None:
                    stamp = timestamp_for(i)
                    for event in events:
                        event["keen"] = {"timestamp": stamp}
                value = encode_record(project, "pageviews", events)
                at = record_time_ms(i) if record_time_ms is not None else None
                pending.append(await producer.send(topic, value, key=project.encode(), timestamp_ms=at))
                if len(pending) >= 5000:
                    await asyncio.gather(*pending)
                    pending = []
            await asyncio.gather(*pending)
        finally:
            await producer.stop()

    asyncio.run(run())
    return records * per_record
