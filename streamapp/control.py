"""The control plane: projects, quotas, shed overrides and shed states, replicated to every worker.

Every change is a record on the control topic (one partition, keyed by
``{type}:{project_id}``). Each worker tails the whole topic with its own
group-less consumer, so every worker holds the same view within a fetch round
trip, whichever worker, CLI or HTTP call published the change. The topic is the
source of truth; a restarted worker rebuilds its view by reading it again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streamapp.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ProjectSettings:
    project_id: str
    write_key: str = ""
    s3_streaming: bool = True
    bucket: str = ""  # empty: the global bucket
    prefix: str | None = None  # None: the global prefix
    quota_eps: float | None = None  # None: the default quota
    quota_bps: float | None = None
    burst: float | None = None
    shed_mode: str | None = None  # None: the default mode
    created_at: float = field(default_factory=time.time)


def new_write_key() -> str:
    return secrets.token_hex(32)


class ControlView:
    """The replicated state, built by applying control records in order."""

    def __init__(self) -> None:
        self.projects: dict[str, ProjectSettings] = {}
        self.overrides: dict[str, dict[str, Any]] = {}  # manual shed/unshed by operators
        self.shed_states: dict[str, dict[str, Any]] = {}  # published by the meters
        self.version = 0
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def apply(self, record: dict[str, Any]) -> None:
        kind = record.get("type")
        project_id = record.get("project_id")
        if not isinstance(project_id, str):
            return
        if kind == "project":
            data = {k: v for k, v in record.items() if k in ProjectSettings.__dataclass_fields__}
            self.projects[project_id] = ProjectSettings(**data)
        elif kind == "quota":
            project = self.projects.get(project_id) or ProjectSettings(project_id, s3_streaming=True)
            for name in ("quota_eps", "quota_bps", "burst", "shed_mode"):
                if name in record:
                    setattr(project, name, record[name])
            self.projects[project_id] = project
        elif kind == "override":
            if record.get("action") in ("shed", "unshed"):
                self.overrides[project_id] = record
            else:
                self.overrides.pop(project_id, None)
        elif kind == "shed_state":
            self.shed_states[project_id] = record.get("state") or {}
        else:
            return
        self.version += 1
        for listener in self.listeners:
            listener(record)


def project_record(project: ProjectSettings) -> dict[str, Any]:
    return {"type": "project", **asdict(project)}


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
                partitions = await self._consumer.partitions_for_topic(self.topic)
                if partitions:
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
