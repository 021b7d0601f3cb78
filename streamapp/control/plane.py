"""The control plane: projects, quotas, shed overrides and shed states, replicated to every worker.

Every change is a record on the control topic (one partition, keyed by
``{type}:{project_id}``). Each worker tails the whole topic with its own
group-less consumer, so every worker holds the same view within a fetch round
trip, whichever worker, CLI or HTTP call published the change. The topic is the
source of truth; a restarted worker rebuilds its view by reading it again.
The records themselves are built in :mod:`streamapp.control.records`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from streamapp.control.view import ControlView
from streamapp.settings import Settings

if TYPE_CHECKING:
    from streamapp.sink.layout import Target

log = logging.getLogger(__name__)


class ControlPlane:
    """Tails the control topic into a ControlView, and publishes changes to it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic_name("control")
        self.view = ControlView()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self.caught_up = asyncio.Event()

    def export_target(self, project_id: str) -> Target | None:
        """(bucket, prefix) where a project's events go, or None when it does not stream to S3."""
        project = self.view.projects.get(project_id)
        if project is None:
            if not self.settings.s3_streaming_default:
                return None
            return (self.settings.s3_bucket, self.settings.s3_prefix)
        if not project.s3_streaming:
            return None
        prefix = project.prefix if project.prefix is not None else self.settings.s3_prefix
        return (project.bucket or self.settings.s3_bucket, prefix)

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all")
        await self._producer.start()
        # Creating the topic through a produce-free metadata request is not portable; a consumer
        # of a missing topic simply waits, and the app declares the topic at start.
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False, group_id=None
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._tail())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer:
            await self._consumer.stop()
        if self._producer:
            await self._producer.stop()

    async def publish(self, record: dict[str, Any]) -> None:
        assert self._producer is not None, "control plane not started"
        key = f"{record['type']}:{record['project_id']}".encode()
        await self._producer.send_and_wait(self.topic, orjson.dumps(record), key=key)

    async def _tail(self) -> None:
        assert self._consumer is not None
        tp = TopicPartition(self.topic, 0)
        while True:
            try:
                # topics() fetches fresh metadata; partitions_for_topic() only reads the cached
                # metadata, which misses a topic created after start for metadata_max_age (5 min).
                if self.topic in await self._consumer.topics():
                    break
            except Exception:  # noqa: BLE001 - topic not there yet
                pass
            await asyncio.sleep(0.5)
        self._consumer.assign([tp])
        await self._consumer.seek_to_beginning(tp)
        end = (await self._consumer.end_offsets([tp]))[tp]
        if end == 0:
            self.caught_up.set()
        while True:
            batches = await self._consumer.getmany(tp, timeout_ms=500, max_records=5000)
            for record in batches.get(tp, []):
                try:
                    self.view.apply(orjson.loads(record.value))
                except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
                    log.warning("ignoring bad control record at %s: %r", record.offset, exc)
                if record.offset + 1 >= end:
                    self.caught_up.set()


async def ensure_control_topic(bootstrap: str, topic: str, replicas: int = 1) -> None:
    """Create the control topic with its one partition unless it exists (a broker's auto-create
    would pick its own partition count, and the views tail partition 0 only)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        if topic in await admin.list_topics():
            return
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=replicas)])
    finally:
        await admin.close()


async def publish_records(bootstrap: str, topic: str, records: list[dict[str, Any]]) -> None:
    """Publish control records with a plain producer (no worker needed), acked by all replicas."""
    await ensure_control_topic(bootstrap, topic)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for record in records:
            key = f"{record['type']}:{record['project_id']}".encode()
            # Partition 0 explicitly: the control topic has one (whatever an auto-create would pick).
            await producer.send_and_wait(topic, orjson.dumps(record), key=key, partition=0)
    finally:
        await producer.stop()


async def read_view(bootstrap: str, topic: str, timeout: float = 10.0) -> ControlView:
    """The control topic read to its current end into a fresh ControlView (no consumer group)."""
    view = ControlView()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        if topic not in await consumer.topics():  # fetches metadata (partitions_for_topic does not)
            return view
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        deadline = time.monotonic() + timeout
        position = await consumer.position(tp)
        while position < end and time.monotonic() < deadline:
            batches = await consumer.getmany(tp, timeout_ms=500, max_records=5000)
            for record in batches.get(tp, []):
                position = record.offset + 1
                try:
                    view.apply(orjson.loads(record.value))
                except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
                    log.warning("ignoring bad control record at %s: %r", record.offset, exc)
        return view
    finally:
        await consumer.stop()
