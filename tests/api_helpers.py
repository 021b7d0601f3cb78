"""Helpers of the API hardening tests (test_api_hostile, test_api_keys, test_read_access).

One worker per test module (``module_worker``), raw HTTP with http.client (every header and byte
under the test's control), and a reader of the events / control topics.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from streamapp.dev import BrokerProcess, S3Process, WorkerProcess
from tests.conftest import app_worker

ADMIN_TOKEN = "admin-tok-3f1c9e"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:300]!r}, {self.elapsed * 1000:.1f} ms)"


def request(
    web: str,
    method: str,
    path: str,
    body: bytes | Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Reply:
    """One request on a fresh connection; ``body`` bytes as they are, anything else as JSON."""
    host, port = web.removeprefix("http://").rsplit(":", 1)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    started = time.perf_counter()
    try:
        conn.request(method, path, body=data, headers=dict(headers or {}))
        response = conn.getresponse()
        payload = response.read()
        return Reply(
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            payload,
            time.perf_counter() - started,
        )
    finally:
        conn.close()


def admin(web: str, method: str, path: str, body: Any = None) -> Reply:
    return request(web, method, path, body, {"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)


def create_project(web: str, project_id: str, **settings: Any) -> str:
    reply = admin(web, "POST", "/admin/projects", {"project_id": project_id, **settings})
    assert reply.status == 201 and reply.json()["replicated"] is True, reply
    return str(reply.json()["write_key"])


def write(web: str, project: str, key: str, body: Any, collection: str | None = None, **kw: Any) -> Reply:
    path = f"/3.0/projects/{project}/events" + (f"/{collection}" if collection else "")
    headers = {"Authorization": key, "Content-Type": "application/json", **kw.pop("headers", {})}
    return request(web, "POST", path, body, headers, **kw)


def topic_values(bootstrap: str, topic: str, timeout: float = 30.0) -> list[bytes]:
    """Every record value on ``topic`` from the beginning up to its end offsets at the call."""
    return [value for _, value in topic_entries(bootstrap, topic, timeout)]


def topic_entries(bootstrap: str, topic: str, timeout: float = 30.0) -> list[tuple[bytes | None, bytes]]:
    """(key, value) of every record on ``topic`` from the beginning up to its end at the call, in
    offset order per partition.

    Up to the end, not "until the topic is quiet": workers write idle ticks into the events topic
    every idle-flush period, so it never is. The end of a partition is the high watermark of the
    first fetch answer, not ``end_offsets``: Tansu answers ListOffsets with the base offset of its
    last batch + 1, which leaves out the rest of a batch of several records.
    """

    async def read() -> list[tuple[bytes | None, bytes]]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
        await consumer.start()
        try:
            # topics() fetches fresh metadata; partitions_for_topic() only reads the cache.
            partitions = consumer.partitions_for_topic(topic) if topic in await consumer.topics() else set()
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            if not tps:
                return []
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            lower = await consumer.end_offsets(tps)  # 0 only when the partition is empty (also on Tansu)
            fetched: dict[TopicPartition, list[Any]] = {tp: [] for tp in tps}
            ends: dict[TopicPartition, int] = {}
            deadline = time.monotonic() + timeout
            pending = {tp for tp in tps if lower[tp] > 0}
            while pending and time.monotonic() < deadline:
                batch = await consumer.getmany(*pending, timeout_ms=500, max_records=10_000)
                for tp, records in batch.items():
                    fetched[tp].extend(records)
                for tp in list(pending):
                    highwater = consumer.highwater(tp)
                    if highwater is None:
                        continue  # no fetch answer for it yet
                    end = ends.setdefault(tp, max(highwater, lower[tp]))
                    if await consumer.position(tp) >= end:
                        pending.discard(tp)
            assert not pending, f"could not read {topic} to its end within {timeout}s"
            return [
                (r.key, r.value)
                for tp in tps
                for r in fetched[tp]
                if r.value is not None and r.offset < ends.get(tp, 0)
            ]
        finally:
            await consumer.stop()

    return asyncio.run(read())


@contextmanager
def module_worker(
    broker: BrokerProcess, s3: S3Process, log_dir: Path, **settings: object
) -> Iterator[tuple[WorkerProcess, dict[str, object]]]:
    """One worker of a fresh app (conftest's ``app_worker``) for a whole test module, with the API
    tests' defaults; yields it and its settings by field name (``env["events_topic"]``)."""
    settings = {
        "admin_token": ADMIN_TOKEN,
        "window_seconds": 2,
        "allowed_lateness_seconds": 1,
        "idle_flush_seconds": 1,
        **settings,
    }
    with app_worker(broker, s3, log_dir, ready_timeout=90, **settings) as app:
        env: dict[str, object] = {
            "kafka_bootstrap": broker.bootstrap,
            "s3_endpoint_url": s3.endpoint_url,
            "s3_bucket": app.bucket,
            "app_id": app.app_id,
            "events_topic": app.events_topic,
            "web_port": app.worker.web_port,
            **settings,
        }
        yield app.worker, env
