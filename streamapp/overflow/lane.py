"""The overflow lane's own Kafka producer: the sink's diversions never wait in Faust's producer.

Above ~10,000 diverted events/s, diversions produced through Faust's shared producer filled it:
the meter's changelog writes then backed up in Faust's producer buffer ("producer buffer full"),
Faust paused the consumer, and the real-time path that the diversion exists to protect stalled
(others' p99 39-77 s in ``streamapp replay``). Here diversions get a dedicated aiokafka producer
(as the HTTP API has its own) and a bounded number of diverted batches and bytes in flight, so
a burst of diversions queues behind its own bound instead of behind everyone's changelog writes,
dead letters and notices. The sink (``Diversions.wait``, streamapp.sink.diversions) stops taking
the diverting partition's records while too many of its diverted bytes wait here.

The producer is built from the settings Faust's own producer uses (bootstrap servers, security,
compression, request timeout), so it honours the same Kafka configuration.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust
from aiokafka import AIOKafkaProducer

from streamapp.infra.producers import start_producer
from streamapp.settings import Settings

log = logging.getLogger(__name__)

#: Diverted batches (overflow records) waiting on a Kafka ack at once: enough to keep the broker
#: busy (aiokafka batches them per partition), few enough that a slow broker is felt at once.
MAX_INFLIGHT_BATCHES = 32
#: ... and their bytes: a diverted batch is one record's excess (a few hundred KB at most).
MAX_INFLIGHT_BYTES = 16 * 1024 * 1024
#: Seconds between attempts to start the producer while the broker is unreachable.
START_RETRY_SECONDS = 1.0


class InflightBudget:
    """At most ``max_items`` items and ``max_bytes`` bytes held at once; waiters are served in order.

    An item bigger than ``max_bytes`` is let through alone (else it could never go).
    """

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.items = 0
        self.bytes = 0
        self._changed = asyncio.Condition()

    def _fits(self, nbytes: int) -> bool:
        if self.items == 0:
            return True
        return self.items < self.max_items and self.bytes + nbytes <= self.max_bytes

    async def acquire(self, nbytes: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._fits(nbytes))
            self.items += 1
            self.bytes += nbytes

    async def release(self, nbytes: int) -> None:
        async with self._changed:
            self.items -= 1
            self.bytes -= nbytes
            self._changed.notify_all()


class OverflowLane:
    """The dedicated producer of diverted batches and its in-flight bound."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.app = app  # its producer's settings are the lane's
        self.settings = settings
        self.producer: AIOKafkaProducer | None = None
        self.started = asyncio.Event()
        self.budget = InflightBudget(MAX_INFLIGHT_BATCHES, MAX_INFLIGHT_BYTES)
        self.produced = 0  # overflow records acknowledged
        self.retries = 0

    def producer_config(self) -> dict[str, Any]:
        """Faust's producer settings (bootstrap, security, compression, timeouts) for this lane."""
        faust_producer: Any = self.app.producer
        config: dict[str, Any] = {**faust_producer._settings_default(), **faust_producer._settings_auth()}
        settings = self.settings
        config.update(
            client_id=f"{settings.app_id}-overflow",
            acks="all",  # a diverted batch is done (its offset committable) only once durable
            # One overflow record is one source record's excess: let a batch hold a few of them.
            max_batch_size=max(1 << 20, settings.max_record_bytes + 4096),
            # ... and a source record of the largest accepted size, plus the overflow head and the
            # signature, must never be refused by this producer (it would be retried forever).
            max_request_size=max(int(config.get("max_request_size") or 0), settings.max_record_bytes + 65536),
        )
        config.pop("partitioner", None)  # diversions name their partition
        return config

    async def start(self) -> None:
        """Start the producer, retrying while the broker is not reachable."""
        if self.producer is None:
            self.producer = await start_producer(self.producer_config(), "overflow", START_RETRY_SECONDS)
        self.started.set()
        log.info(
            "overflow producer started (acks=all, at most %d batches / %d MiB in flight)",
            MAX_INFLIGHT_BATCHES,
            MAX_INFLIGHT_BYTES >> 20,
        )

    async def stop(self) -> None:
        producer, self.producer = self.producer, None
        self.started.clear()
        if producer is not None:
            await producer.stop()

    async def produce(self, topic: str, key: bytes, value: bytes, partition: int, headers: Any) -> None:
        """Produce one overflow record and return once Kafka acknowledged it (retrying meanwhile).

        Waits for a place in the in-flight bound first: that wait, not Faust's producer, is where
        a burst of diversions queues.
        """
        nbytes = len(value)
        await self.budget.acquire(nbytes)
        try:
            while True:
                producer = self.producer
                if producer is None:
                    await self.started.wait()
                    continue
                try:
                    fut = await producer.send(topic, value, key=key, partition=partition, headers=headers)
                    await fut
                    break
                except Exception as exc:  # noqa: BLE001 - Kafka hiccup: retry, never lose the excess
                    self.retries += 1
                    log.warning("overflow produce failed (%r); retrying", exc)
                    await asyncio.sleep(0.5)
        finally:
            await self.budget.release(nbytes)
        self.produced += 1
