"""Parked destinations: a tenant's broken S3 destination costs only that tenant.

When an upload to a project's own bucket fails with a tenant error (missing bucket, access
denied, KMS key unusable: ``streamapp.sink.s3_errors``), the object is *parked*: written with
the same bytes to the service's own bucket under

    {prefix}/_parked/{app_id}/{topic}/{partition}/{project}/{bucket}/{key}

(``topic``: the events topic for the real-time sink, the overflow topic for the drain's
delayed objects)
(the key alone says where it belongs; user metadata adds the reason, the time and the
object's "object written" notice). A parked object is durable, so the partition's commit
point moves past it and its upload slot and pending bytes are released at once. While a
project is parked its new objects go straight to the quarantine (no slot spent on a request
that fails).

The redeliverer (``Parking.run``, one task per worker) copies each parked object of a due
project to its original bucket and key (server-side copy, same bytes, no metadata of ours)
and then deletes the parked copy; the first tenant error ends the attempt and the project
stays parked until the next one (``STREAMAPP_S3_PARKED_RETRY_SECONDS``, or an operator's
retry now). A crash between copy and delete copies again to the same key with the same
bytes, and a replay re-parks under the same parked key: one object per key, exactly once.
Each worker redelivers the partitions it owns; it lists their parked prefixes whenever its
assignment changes (and every ``RESCAN_SECONDS``), so parked objects survive restarts and
rebalances.

``ParkingBook`` (streamapp.sink.parking_book) is the bookkeeping, pure (times are passed in):
what is parked, why, since when, and when to try again; this module is the service that
delivers, parks and redelivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import faust
import orjson
from botocore.exceptions import BotoCoreError, ClientError

from streamapp.settings import Settings
from streamapp.sink.layout import KIND_MANIFEST_PART
from streamapp.sink.parking_book import (
    ParkedObject,
    ParkedOrigin,
    ParkingBook,
    parked_key,
    parked_root,
    parse_parked_key,
)
from streamapp.sink.s3 import S3Writer
from streamapp.sink.s3_errors import DestinationError, classify_exception, error_code_and_status

log = logging.getLogger(__name__)

RESCAN_SECONDS = 60.0  # list the owned partitions' parked prefixes at least this often
LOOP_SECONDS = 1.0
CONTENT_TYPE = "application/gzip"  # only data objects are parked (manifest parts go to the service bucket)
META_REASON = "streamapp-reason"
META_PARKED_AT = "streamapp-parked-at"
META_NOTICE = "streamapp-notice"


# -------------------------------------------------------------------------------------- service
@dataclass(frozen=True, slots=True)
class Delivery:
    """Outcome of ``Parking.deliver``: where the object went."""

    size: int
    parked_key: str | None = None  # set: parked, not in its destination yet
    reason: str = ""


class ParkableObject(Protocol):
    """What the sink's ``PendingObject`` and the drain's ``DelayedObject`` have in common."""

    bucket: str
    key: str
    kind: str
    project_id: str
    start: int

    def body(self) -> bytes: ...

    def describe(self) -> dict[str, Any]: ...


class Parking:
    """Delivers tenant objects or parks them; redelivers parked ones in the background."""

    def __init__(
        self,
        *,
        app: faust.App,
        settings: Settings,
        s3: S3Writer,
        objects_topic: str,
        spawn: Callable[[Awaitable[Any]], None],
    ) -> None:
        self.app = app  # its consumer's assignment (what to redeliver) and producer (notices)
        self.settings = settings
        self.s3 = s3
        self.objects_topic = objects_topic
        self.spawn = spawn
        self.book = ParkingBook(self.settings.s3_parked_retry_seconds)
        self.bucket = self.settings.s3_bucket
        # One quarantine root per lane that writes objects: the events topic (the real-time sink)
        # and the overflow topic (the drain's delayed objects); each is redelivered by its owner.
        self.roots = {
            topic: parked_root(self.settings.s3_prefix, self.settings.app_id, topic)
            for topic in (self.settings.events_topic, self.settings.topic_name("overflow"))
        }
        self._redeliver_s3: S3Writer | None = None  # one thread of its own: never takes the sink's pool
        self._wake = asyncio.Event()
        self._scanned: set[tuple[str, int]] = set()
        self._scanned_at = 0.0

    # ------------------------------------------------------------------------------- delivery
    def eligible(self, obj: ParkableObject) -> bool:
        """Only data objects bound for a bucket other than the service's own can be parked.

        A failing service bucket is everybody's outage (the quarantine lives there too): retry.
        """
        return obj.kind != KIND_MANIFEST_PART and obj.bucket != self.bucket

    async def put(self, topic: str, partition: int, obj: ParkableObject, content_type: str) -> Delivery:
        """Write a data object of the lane ``topic``: parked when its own bucket fails, else as ever."""
        if self.eligible(obj):
            return await self.deliver(partition, obj, content_type, topic)
        return Delivery(await self.s3.put(obj.bucket, obj.key, obj.body, content_type))

    async def deliver(
        self, partition: int, obj: ParkableObject, content_type: str, topic: str | None = None
    ) -> Delivery:
        """Write ``obj`` to its destination, or park it there on a tenant error (or while parked)."""
        topic = topic or self.settings.events_topic
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(self.s3.pool, obj.body)
        if not self.book.is_parked(obj.project_id):
            try:
                size = await self.s3.put(obj.bucket, obj.key, lambda: body, content_type, tenant=True)
                return Delivery(size)
            except DestinationError as exc:
                reason = exc.reason
                log.warning("project %s: %s/%s failed (%s): parking it", obj.project_id, obj.bucket, obj.key, reason)
        else:
            reason = self.book.tenants[obj.project_id].reason
        target = parked_key(self.roots[topic], partition, obj.project_id, obj.bucket, obj.key)
        now = time.time()
        notice = {**obj.describe(), "window_start": obj.start, "gzip_bytes": len(body), "partition": partition}
        metadata = {
            META_REASON: _ascii(reason)[:512],
            META_PARKED_AT: f"{now:.3f}",
            META_NOTICE: json.dumps(notice, ensure_ascii=True, separators=(",", ":"))[:1200],
        }
        # Into the service's own bucket, retried like any other write of the service.
        await self.s3.put(self.bucket, target, lambda: body, content_type, metadata=metadata)
        parked = ParkedObject(target, topic, partition, obj.project_id, obj.bucket, obj.key, len(body))
        self.book.parked(parked, reason, now)
        self._wake.set()
        return Delivery(len(body), target, reason)

    def notice_fields(self, delivery: Delivery) -> dict[str, Any]:
        """What an object's ``events-s3-objects`` notice adds about where it went."""
        if delivery.parked_key is None:
            return {"status": "written"}
        return {
            "status": "parked",
            "parked_bucket": self.bucket,
            "parked_key": delivery.parked_key,
            "reason": delivery.reason,
        }

    # ----------------------------------------------------------------------------- redelivery
    def retry_now(self, project_id: str | None = None) -> list[str]:
        """Operator's "retry now": due at once; returns the projects concerned on this worker."""
        projects = self.book.retry_now(project_id)
        self._wake.set()
        return projects

    def owned_partitions(self) -> set[tuple[str, int]] | None:
        """(lane topic, partition)s assigned to this worker (None while unknown)."""
        try:
            assignment = self.app.consumer.assignment()
        except Exception:  # noqa: BLE001 - consumer not started yet
            return None
        return {(tp.topic, tp.partition) for tp in assignment if tp.topic in self.roots}

    async def run(self) -> None:
        """The redeliverer: rescans on assignment changes, redelivers due projects; never raises."""
        while True:
            try:
                await self.step(time.time())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bad object must not stop redelivery of others
                log.warning("parking: redelivery round failed: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=LOOP_SECONDS)
            self._wake.clear()

    async def step(self, now: float) -> None:
        owned = self.owned_partitions()
        if owned is not None:
            await self.rescan(owned, now)
        for project_id in self.book.due(time.time()):
            await self.redeliver(project_id)

    async def rescan(self, owned: set[tuple[str, int]], now: float) -> None:
        """List the parked prefixes of newly owned partitions (all of them every RESCAN_SECONDS)."""
        self.book.forget_partitions(owned)
        if now - self._scanned_at >= RESCAN_SECONDS:
            todo, self._scanned_at = set(owned), now
        else:
            todo = owned - self._scanned
        self._scanned &= owned
        for topic, partition in sorted(todo):
            root = self.roots[topic]
            try:
                listed = await self._list(f"{root}{partition}/")
            except (ClientError, BotoCoreError, OSError) as exc:
                log.warning("parking: cannot list parked objects of %s/%s: %r", topic, partition, exc)
                continue
            objects = [o for o in (parse_parked_key(root, topic, k, n) for k, n in listed) if o is not None]
            origins = {pid: await self._origin(key) for pid, key in self.book.unknown_projects(objects).items()}
            self.book.discovered(objects, now, origins)
            self._scanned.add((topic, partition))
            if objects:
                log.info("parking: %d parked objects found for %s/%s", len(objects), topic, partition)

    async def redeliver(self, project_id: str) -> None:
        """Copy the project's parked objects home, oldest first; stop at the first error."""
        objects = self.book.attempt_started(project_id, time.time())
        for obj in objects:
            try:
                notice = await self._copy_home(obj)
            except Exception as exc:  # noqa: BLE001 - classified below; transient ones too wait for the next attempt
                kind, reason = classify_exception(exc)
                self.book.attempt_failed(project_id, kind, reason, time.time())
                log.info("parking: project %s still parked (%s)", project_id, reason)
                return
            if self.book.redelivered(obj):
                log.info("parking: project %s redelivered, no longer parked", project_id)
            if notice is not None:
                where = {"bucket": obj.bucket, "key": obj.key, "project_id": obj.project_id}
                self._notify({**notice, **where, "status": "redelivered", "redelivered_at": time.time()}, obj.key)
        if self.book.is_parked(project_id):
            self.book.retry_now(project_id)  # objects parked during this pass: the destination works, go on

    async def _copy_home(self, obj: ParkedObject) -> dict[str, Any] | None:
        """Copy one parked object to its destination, then delete it; its notice (None if already gone)."""
        client = self._redeliverer().client
        loop = asyncio.get_running_loop()
        pool = self._redeliverer().pool
        try:
            head = await loop.run_in_executor(pool, lambda: client.head_object(Bucket=self.bucket, Key=obj.parked_key))
        except ClientError as exc:
            if error_code_and_status(exc)[1] == 404:
                return None  # redelivered by someone else (a previous owner, an operator)
            raise
        await loop.run_in_executor(
            pool,
            lambda: client.copy_object(
                Bucket=obj.bucket,
                Key=obj.key,
                CopySource={"Bucket": self.bucket, "Key": obj.parked_key},
                MetadataDirective="REPLACE",  # the tenant's object is as a direct upload: no metadata of ours
                ContentType=CONTENT_TYPE,
            ),
        )
        await loop.run_in_executor(pool, lambda: client.delete_object(Bucket=self.bucket, Key=obj.parked_key))
        try:
            notice = orjson.loads((head.get("Metadata") or {}).get(META_NOTICE) or "{}")
        except orjson.JSONDecodeError:
            notice = {}
        return notice if isinstance(notice, dict) else {}

    async def _origin(self, parked_key: str) -> ParkedOrigin:
        """After a restart: the reason and time stored with a parked object (a default if unreadable)."""
        client, pool = self._redeliverer().client, self._redeliverer().pool
        try:
            head = await asyncio.get_running_loop().run_in_executor(
                pool, lambda: client.head_object(Bucket=self.bucket, Key=parked_key)
            )
        except (ClientError, BotoCoreError, OSError):
            return ParkedOrigin()
        meta = head.get("Metadata") or {}
        try:
            since = float(meta.get(META_PARKED_AT, ""))
        except ValueError:
            since = None
        reason = str(meta.get(META_REASON) or "")
        return ParkedOrigin(reason, since) if reason else ParkedOrigin(since=since)

    async def _list(self, prefix: str) -> list[tuple[str, int]]:
        client, pool = self._redeliverer().client, self._redeliverer().pool

        def listing() -> list[tuple[str, int]]:
            out: list[tuple[str, int]] = []
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                out.extend((item["Key"], int(item.get("Size", 0))) for item in page.get("Contents", []))
            return out

        return await asyncio.get_running_loop().run_in_executor(pool, listing)

    def _redeliverer(self) -> S3Writer:
        if self._redeliver_s3 is None:
            self._redeliver_s3 = S3Writer(self.settings, threads=1)
        return self._redeliver_s3

    def _notify(self, notice: dict[str, Any], key: str) -> None:
        """An ``events-s3-objects`` record (best effort, like the sink's own notices)."""
        self.spawn(self.app.producer.send(self.objects_topic, key.encode(), orjson.dumps(notice), None, None, None))

    def close(self) -> None:
        if self._redeliver_s3 is not None:
            self._redeliver_s3.close()


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")
