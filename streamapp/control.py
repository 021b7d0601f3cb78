"""The control plane: projects, quotas, shed overrides and shed states, replicated to every worker.

Every change is a record on the control topic (one partition, keyed by
``{type}:{project_id}``). Each worker tails the whole topic with its own
group-less consumer, so every worker holds the same view within a fetch round
trip, whichever worker, CLI or HTTP call published the change. The topic is the
source of truth; a restarted worker rebuilds its view by reading it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
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
    """A project as the control topic has it. Write keys are kept only as hashes (:func:`hash_key`):
    the key itself is shown once, when it is made, and never written anywhere."""

    project_id: str
    key_hash: str = ""  # "" = no valid key (revoked, or created by a quota record only)
    previous_key_hash: str = ""  # the key before the last rotation, valid until ...
    previous_key_expires_at: float | None = None  # ... this epoch time
    key_revoked_at: float | None = None  # set by a revocation (until the next rotation)
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


KEY_HASH_PREFIX = "sha256:"
#: Compared when a project is unknown, so that an unknown id costs the same as a wrong key.
_NO_PROJECT_HASH = KEY_HASH_PREFIX + "0" * 64


def hash_key(key: str) -> str:
    """The stored form of a write key. Plain SHA-256 is enough: keys are 256 random bits, so there
    is nothing to brute-force that a slow hash would protect (and it keeps the write path cheap)."""
    return KEY_HASH_PREFIX + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


def key_matches(project: ProjectSettings | None, provided: str, now: float) -> bool:
    """Is ``provided`` the project's key, or its previous key within the rotation grace period?

    Constant time in the key (hashes compared with hmac.compare_digest), and the same work for an
    unknown project (None) as for a wrong key.
    """
    given = hash_key(provided).encode()
    if project is None:
        # The same two comparisons as for a known project with a wrong key.
        hmac.compare_digest(given, _NO_PROJECT_HASH.encode())
        hmac.compare_digest(given, _NO_PROJECT_HASH.encode())
        return False
    key_hash, previous_hash = project.key_hash, project.previous_key_hash
    # Type checks: a malformed control record must read as "no key", never raise on the write path.
    current = isinstance(key_hash, str) and hmac.compare_digest(given, key_hash.encode()) and bool(key_hash)
    expires = project.previous_key_expires_at
    previous = (
        isinstance(previous_hash, str)
        and hmac.compare_digest(given, previous_hash.encode())
        and bool(previous_hash)
        and isinstance(expires, int | float)
        and now < expires
    )
    return current or previous


def key_record(
    project_id: str, key_hash: str, previous_key_hash: str = "", previous_key_expires_at: float | None = None
) -> dict[str, Any]:
    """A ``key`` record: replaces only the key fields of a project (rotation; an empty ``key_hash``
    is a revocation)."""
    now = time.time()
    return {
        "type": "key",
        "project_id": project_id,
        "key_hash": key_hash,
        "previous_key_hash": previous_key_hash,
        "previous_key_expires_at": previous_key_expires_at,
        "key_revoked_at": None if key_hash else now,
        "at": now,
    }


#: The key fields of ProjectSettings: changed only by ``key`` records; hashes never leave the view.
KEY_FIELDS = ("key_hash", "previous_key_hash", "previous_key_expires_at", "key_revoked_at")
SECRET_KEY_FIELDS = ("key_hash", "previous_key_hash")


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
            legacy_key = record.get("write_key")
            if isinstance(legacy_key, str) and legacy_key and not data.get("key_hash"):
                data["key_hash"] = hash_key(legacy_key)  # a record from before keys were hashed
            self.projects[project_id] = ProjectSettings(**data)
        elif kind == "key":
            project = self.projects.get(project_id)
            if project is None:
                return
            for name in KEY_FIELDS:
                if name in record:
                    setattr(project, name, record[name])
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


# ------------------------------------------------ operator records (quotas, shed overrides)
# Built here so the CLI (``streamapp quota|shed|unshed``) and the admin HTTP API publish the
# very same records; the meters of all workers read them from their ControlView.

from streamapp.metering import SHED_MODES  # noqa: E402 - the one shed vocabulary


def quota_record(
    project_id: str,
    *,
    quota_eps: float | None = None,
    quota_bps: float | None = None,
    burst: float | None = None,
    shed_mode: str | None = None,
    reset: bool = False,
) -> dict[str, Any]:
    """A ``quota`` record: only the given fields change; ``reset`` puts all four back to the defaults."""
    if shed_mode is not None and shed_mode not in SHED_MODES:
        raise ValueError(f"shed mode must be one of {SHED_MODES}, got {shed_mode!r}")
    for name, value in (("quota_eps", quota_eps), ("quota_bps", quota_bps)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if burst is not None and not burst >= 0:
        raise ValueError(f"burst must be >= 0, got {burst}")
    record: dict[str, Any] = {"type": "quota", "project_id": project_id}
    if reset:
        record.update(quota_eps=None, quota_bps=None, burst=None, shed_mode=None)
    for name, value in (("quota_eps", quota_eps), ("quota_bps", quota_bps), ("burst", burst), ("shed_mode", shed_mode)):
        if value is not None:
            record[name] = value
    return record


def override_record(project_id: str, action: str, reason: str = "", mode: str | None = None) -> dict[str, Any]:
    """Manual ``shed``/``unshed`` (wins over the rates until ``clear``)."""
    if action not in ("shed", "unshed", "clear"):
        raise ValueError(f"action must be shed, unshed or clear, got {action!r}")
    if mode is not None and mode not in SHED_MODES:
        raise ValueError(f"shed mode must be one of {SHED_MODES}, got {mode!r}")
    record: dict[str, Any] = {"type": "override", "project_id": project_id, "action": action, "reason": reason}
    if mode is not None:
        record["mode"] = mode
    record["at"] = time.time()
    return record


async def ensure_control_topic(bootstrap: str, topic: str, replicas: int = 1) -> None:
    """Create the control topic with its one partition unless it exists (a broker's auto-create
    would pick its own partition count, and the views tail partition 0 only)."""
    import contextlib

    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

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
