"""The load generator behind ``streamapp produce`` (and the integration tests): events that follow
the event contract, straight to the events topic with a plain Kafka producer, at a steady rate spread
over projects, with optional per-project spikes."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import orjson
from aiokafka import AIOKafkaProducer


async def produce_load(
    bootstrap: str,
    topic: str,
    *,
    rate: float,
    projects: list[str],
    duration: float,
    batch: int = 1,
    spikes: list[tuple[str, float, float, float]] | None = None,
    collection: str = "pageviews",
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, int]:
    """Send events at ``rate`` spread evenly over ``projects``; returns events sent per project."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1 << 20, acks="all")
    await producer.start()
    per_project = rate / max(1, len(projects))
    sent = dict.fromkeys(projects, 0)
    carry = dict.fromkeys(projects, 0.0)
    rng = random.Random(7)
    started = time.monotonic()
    tick = 0.1
    try:
        while not should_stop():
            elapsed = time.monotonic() - started
            if elapsed >= duration:
                break
            futures = []
            now_iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"
            for project in projects:
                factor = 1.0
                for name, spike_factor, start, length in spikes or []:
                    if name == project and start <= elapsed < start + length:
                        factor = spike_factor
                carry[project] += per_project * factor * tick
                count = int(carry[project])
                carry[project] -= count
                key = project.encode()
                while count > 0:
                    n = min(batch, count)
                    events = [
                        {"n": sent[project] + i, "value": rng.random(), "keen": {"timestamp": now_iso}}
                        for i in range(n)
                    ]
                    if n == 1 and batch == 1:
                        body = {"project_id": project, "collection": collection, "event": events[0]}
                    else:
                        body = {"project_id": project, "collection": collection, "events": events}
                    futures.append(await producer.send(topic, orjson.dumps(body), key=key))
                    sent[project] += n
                    count -= n
            if futures:
                await asyncio.gather(*futures)
            next_at = started + (int(elapsed / tick) + 1) * tick
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    finally:
        await producer.stop()
    return sent
