"""The S3 sink: carries out what the per-partition window state machines decide.

For each batch from the events topic it feeds records to ``PartitionWindows``,
uploads the objects that come out (in parallel, bounded), diverts excess to the
overflow topic, dead-letters invalid records, and commits a partition's offset
only after everything before it is durable and the checkpoint for that offset
is in S3. Consumption stalls (and Kafka fetching pauses) while too many bytes
are waiting for S3, so memory stays bounded whatever the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from faust.types import TP, StreamT

from streamapp.contract import TICK_KEY, dead_letter_key, invalid_record_value, position
from streamapp.control_records import (
    SHED_MODES,
    ShedMarker,
    Tick,
    control_headers,
    control_secrets,
    parse_control,
    verify_control,
)
from streamapp.metering.unknown import UNKNOWN_FLOW
from streamapp.overflow.chunks import overflow_record
from streamapp.overflow.lane import OverflowLane
from streamapp.sink.layout import (
    KIND_MANIFEST_PART,
    Target,
    checkpoint_key,
    manifest_key,
    manifest_parts_prefix,
)
from streamapp.sink.partition import InvalidItem, PartitionWindows, PendingObject, Route
from streamapp.sink.s3 import S3Writer
from streamapp.sink.uploads import FairQueue

if TYPE_CHECKING:
    from streamapp.runtime import Runtime

log = logging.getLogger(__name__)
COMMIT_INTERVAL_SECONDS = 1.0
YIELD_EVERY_EVENTS = 5000  # ~20 ms of sink work on this project's machine
BACKLOG_CACHE_SECONDS = 1.5  # > the meter tick (1 s), which reads it for the health check
#: A partition's diverted bytes not yet acknowledged by Kafka above which the sink stops taking
#: records until the overflow lane catches up (backpressure from the lane's own producer).
MAX_DIVERTING_BYTES = 32 * 1024 * 1024


@dataclass
class PartitionStatus:
    """What the views show per partition."""

    committed_offset: int = 0
    seen_pos: int = 0
    last_message_at: float = field(default_factory=time.monotonic)
    oldest_unflushed_event_at: float | None = None
    last_flush_at: float = 0.0


class S3Sink:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.s3: S3Writer = runtime.s3
        self.topic = self.settings.events_topic
        self.partitions: dict[int, PartitionWindows] = {}
        self.status: dict[int, PartitionStatus] = {}
        self._opening: dict[int, asyncio.Future[PartitionWindows]] = {}
        self._uploads: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(self.settings.s3_upload_concurrency * 2)
        # Objects wait here, not as tasks, and start in fair order (see streamapp.sink.uploads).
        self._upload_queue: FairQueue[tuple[PartitionWindows, int, PendingObject]] = FairQueue()
        self._upload_limit = self.settings.s3_upload_concurrency * 2
        self._uploading = 0
        self._backlog_cache: dict[int, tuple[float, PartitionWindows, dict[str, Any]]] = {}
        self.pending_bytes = 0
        self.max_pending_bytes = max(64 * 1024 * 1024, self.settings.max_object_bytes * 2)
        self._drained = asyncio.Event()
        self._drained.set()
        self._commit_wanted = asyncio.Event()
        self._manifest_checks: set[int] = set()
        self._unopened_ticks: dict[int, float] = {}  # partition -> monotonic time of its last tick
        self.invalid_out = 0
        self.objects_written = 0
        self.control_rejected = 0  # NUL-keyed records refused (unsigned, forged, misplaced)
        # The first signs this worker's ticks; any of them verifies (a rotation: control_records).
        self._control_secrets = control_secrets(self.settings.control_secret) or (b"",)
        self._control_secret = self._control_secrets[0]
        # Diversions have their own producer (streamapp.overflow.lane), never Faust's shared one.
        self.overflow = OverflowLane(runtime)
        self.diverting_bytes: dict[int, int] = {}  # partition -> diverted bytes not acknowledged yet
        self._diverted_acked = asyncio.Event()

    @property
    def events_in(self) -> int:
        """Events read by the partitions this worker holds now."""
        return sum(w.events_in for w in self.partitions.values())

    # ----------------------------------------------------------- partitions
    def manifest_target(self) -> Target:
        return (self.settings.s3_bucket, self.settings.s3_prefix)

    def target(self, project_id: str) -> Target | None:
        return self.runtime.export_target(project_id)

    def known(self, project_id: str) -> bool:
        """Created in the control plane (STREAMAPP_UNKNOWN_PROJECTS applies to the others)."""
        return project_id in self.runtime.control.view.projects

    async def partition(self, tp: TP) -> PartitionWindows:
        windows = self.partitions.get(tp.partition)
        if windows is not None:
            return windows
        opening = self._opening.get(tp.partition)
        if opening is None:
            opening = self._opening[tp.partition] = asyncio.ensure_future(self._open(tp))
        try:
            return await opening
        finally:
            self._opening.pop(tp.partition, None)

    async def _open(self, tp: TP) -> PartitionWindows:
        """Restore a partition from the checkpoint stored with its committed offset."""
        consumer = self.runtime.app.consumer
        committed = (await consumer.committed_offsets([tp])).get(tp)  # type: ignore[attr-defined]
        checkpoint: dict[str, Any] | None = None
        if committed:
            bucket, prefix = self.manifest_target()
            body = await self.s3.get(
                bucket, checkpoint_key(prefix, self.settings.app_id, self.topic, tp.partition, committed)
            )
            if body is None:
                log.error("no checkpoint for %s at committed offset %s: starting there without one", tp, committed)
                checkpoint = {"position": position(committed)}
            else:
                checkpoint = orjson.loads(body)
        windows = PartitionWindows(
            self.topic,
            tp.partition,
            window_seconds=self.settings.window_seconds,
            lateness=self.settings.allowed_lateness_seconds,
            max_object_bytes=self.settings.max_object_bytes,
            max_event_bytes=self.settings.max_event_bytes,
            max_record_bytes=self.settings.max_record_bytes,
            target=self.target,
            manifest_target=self.manifest_target(),
            checkpoint=checkpoint,
            max_future_seconds=self.settings.max_future_seconds,
            known=self.known,
            unknown_policy=self.settings.unknown_projects,
        )
        self.partitions[tp.partition] = windows
        self.status[tp.partition] = PartitionStatus(committed_offset=committed or 0)
        log.info("sink partition %s opened at offset %s", tp.partition, committed)
        return windows

    def revoke(self, tps: Iterable[TP]) -> None:
        """Forget revoked partitions: their new owner replays from the committed offset."""
        for tp in tps:
            if tp.topic == self.topic:
                self.partitions.pop(tp.partition, None)
                self.status.pop(tp.partition, None)

    # ---------------------------------------------------------------- input
    async def consume(self, stream: StreamT) -> None:
        """The agent's loop: each item is one fetched batch of a partition (see streamapp.transport).

        The window state machines batch by themselves (an object per window); the loop hands
        records over and dispatches only when an object, a diversion or a dead letter came out.
        """
        async for event in stream.events():
            message = event.message
            await self.handle_batch(message.tp, event.value, message.generation_id)

    async def handle_batch(self, tp: TP, records: Iterable[Any], generation_id: int | None = None) -> None:
        """Raw records of one partition in offset order (objects with offset/timestamp ms/key/value).

        ``generation_id`` is the consumer generation the records were fetched in: if a rebalance
        happens while the batch is worked through, the rest is abandoned (the partition is read
        again from its commit, here or by its next owner) and a revoked partition's output is
        discarded, as its next owner writes the same objects.
        """
        app = self.runtime.app
        windows = self.partitions.get(tp.partition)
        if windows is None:
            windows = await self.partition(tp)
            if generation_id is not None and app.consumer_generation_id != generation_id:
                return
        process = windows.process
        gaps = windows.offset_gaps
        yield_at = windows.events_in + YIELD_EVERY_EVENTS
        for record in records:
            key = record.key
            try:
                if key is not None and key[:1] == b"\x00":
                    self._control(windows, record.offset, key, record.value, getattr(record, "headers", None))
                else:
                    process(record.offset, record.timestamp, key, record.value)
            except Exception as exc:  # noqa: BLE001 - a record can only ever cost itself
                self._record_failed(windows, tp.partition, record, exc)
            if windows.outbox or windows.diverted or windows.invalid:
                # Start the uploads now (they run while the rest of the batch is processed).
                self._dispatch_if_owned(tp.partition, windows)
                yield_at = 0
            if windows.events_in >= yield_at:
                # A fetched batch can be thousands of records: let uploads and HTTP requests in
                # (~20 ms of work at most between yields), and stop taking records while too
                # many bytes wait for S3.
                await (self.wait_for_s3() if self.pending_bytes > self.max_pending_bytes else asyncio.sleep(0))
                await self.wait_for_overflow(tp.partition)
                if generation_id is not None and app.consumer_generation_id != generation_id:
                    break
                yield_at = windows.events_in + YIELD_EVERY_EVENTS
        if windows.offset_gaps != gaps:
            log.warning("sink partition %s: a gap in the offsets read (now at %s)", tp.partition, windows.read_offset)
        self._dispatch_if_owned(tp.partition, windows)
        await self.wait_for_s3()
        await self.wait_for_overflow(tp.partition)

    def _record_failed(self, windows: PartitionWindows, partition: int, record: Any, exc: Exception) -> None:
        """The safety net: a record whose handling raised is dead-lettered and read past.

        The contract checks should have caught it (``InvalidRecord``); reaching here is a bug to
        fix, but it must not stop the partition, nor crash-loop a replay (the decision is the same
        on replay, and records before the checkpoint are not dead-lettered twice).
        """
        log.warning(
            "sink partition %s: record at offset %s failed (%s: %.200s); dead-lettered",
            partition,
            record.offset,
            type(exc).__name__,
            exc,
        )
        windows.reject(record.offset, record.key, record.value, f"record failed: {type(exc).__name__}: {exc}"[:500])

    def _dispatch_if_owned(self, partition: int, windows: PartitionWindows) -> None:
        if not (windows.outbox or windows.diverted or windows.invalid):
            return
        if self.partitions.get(partition) is windows:
            self._dispatch(partition, windows)
        else:  # revoked meanwhile: its next owner writes the same
            windows.outbox.clear()
            windows.diverted.clear()
            windows.invalid.clear()

    async def wait_for_s3(self) -> None:
        """Backpressure: stop taking events while too many bytes wait for S3 (Faust pauses fetching)."""
        while self.pending_bytes > self.max_pending_bytes:
            self._drained.clear()
            await self._drained.wait()

    async def wait_for_overflow(self, partition: int) -> None:
        """Backpressure from the overflow lane: while over ``MAX_DIVERTING_BYTES`` of this
        partition's diversions wait for Kafka, take no more records (the lane's own producer is
        behind; Faust's shared producer is never involved)."""
        while self.diverting_bytes.get(partition, 0) > MAX_DIVERTING_BYTES:
            self._diverted_acked.clear()
            await self._diverted_acked.wait()

    def _control(
        self, windows: PartitionWindows, offset: int, key: bytes, value: bytes | None, headers: Any = None
    ) -> None:
        """A NUL-keyed record: obeyed only when signed for this partition (streamapp.control_records).

        Anything else is read past, counted and dead-lettered. Never raises, whatever the bytes.
        """
        try:
            rejected = verify_control(self._control_secrets, self.topic, windows.partition, key, value, headers)
            meaning = parse_control(key, value) if rejected is None else None
        except Exception as exc:  # noqa: BLE001 - a record's bytes must never stop the sink
            rejected, meaning = f"control record not understood: {exc!r}", None
        if isinstance(meaning, Tick):
            windows.tick(offset, meaning.watermark)
        elif isinstance(meaning, ShedMarker):
            mode = meaning.mode
            route = Route(mode, meaning.fraction) if mode in SHED_MODES else None
            windows.marker(offset, meaning.project_id, route)
        elif meaning == "unknown control record key":
            windows.skip_record(offset)  # signed by a (newer) worker: not for this version
        else:
            # Forged, copied from another partition, or (signed yet) malformed: never obeyed.
            fresh = position(offset + 1) > windows.next_pos and position(offset) >= windows.skip_pos
            windows.skip_record(offset)
            if fresh:  # not dead-lettered again when a redelivery is read past
                reason = rejected if rejected is not None else str(meaning)
                windows.invalid.append(InvalidItem(offset, key, value, reason))
                self.control_rejected += 1
                self.runtime.metrics.control_rejected.inc()
                if self.control_rejected <= 10 or self.control_rejected % 1000 == 0:
                    log.warning(
                        "sink partition %s offset %s: control record %r refused (%s); %d so far",
                        windows.partition,
                        offset,
                        key[:32],
                        reason,
                        self.control_rejected,
                    )

    def _dispatch(self, partition: int, windows: PartitionWindows) -> None:
        producer = self.runtime.app.producer
        topics = self.runtime.topics
        if windows.invalid:
            for item in windows.invalid:
                value = invalid_record_value(
                    item.reason,
                    topic=self.topic,
                    partition=partition,
                    offset=item.offset,
                    key=item.key,
                    value=item.value,
                )
                key = dead_letter_key(item.key)
                self.runtime.spawn(producer.send(topics.invalid.get_topic_name(), key, value, None, None, None))
            self.invalid_out += len(windows.invalid)
            windows.invalid.clear()
        for batch in windows.diverted:
            value = overflow_record(batch.project_id, batch.collection, partition, batch.positions, batch.events)
            self.diverting_bytes[partition] = self.diverting_bytes.get(partition, 0) + len(value)
            self._track(self._divert(windows, partition, batch.id, batch.project_id, value))
        windows.diverted.clear()
        queue = self._upload_queue
        for obj in windows.outbox:
            self.pending_bytes += obj.nbytes
            queue.push(self._upload_flow(obj), (windows, partition, obj))
        windows.outbox.clear()
        self._start_uploads()

    def _upload_flow(self, obj: PendingObject) -> str:
        """Fair-queue flow of an object: its project if created, else all unknown projects as one."""
        if obj.kind == KIND_MANIFEST_PART:
            return ""
        return obj.project_id if self.known(obj.project_id) else UNKNOWN_FLOW

    def _start_uploads(self) -> None:
        queue = self._upload_queue
        while queue and self._uploading < self._upload_limit:
            windows, partition, obj = queue.pop()
            self._uploading += 1
            task = asyncio.ensure_future(self._upload(windows, partition, obj))
            self._uploads.add(task)
            task.add_done_callback(self._upload_finished)

    def _upload_finished(self, task: asyncio.Task[None]) -> None:
        self._uploads.discard(task)
        self._uploading -= 1
        if not task.cancelled():  # cancelled: the worker is stopping
            self._start_uploads()

    def _track(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._uploads.add(task)
        task.add_done_callback(self._uploads.discard)

    async def _divert(
        self, windows: PartitionWindows, partition: int, item_id: int, project: str, value: bytes
    ) -> None:
        """Produce a diverted batch through the overflow lane; done (committable) once acknowledged."""
        topic = self.runtime.topics.overflow.get_topic_name()
        key = project.encode()
        # Signed like a control record: the drain delivers only what a worker diverted.
        headers = control_headers(self._control_secret, topic, partition, key, value)
        try:
            await self.overflow.produce(topic, key, value, partition, headers)
        finally:
            left = self.diverting_bytes.get(partition, 0) - len(value)
            if left > 0:
                self.diverting_bytes[partition] = left
            else:
                self.diverting_bytes.pop(partition, None)
            self._diverted_acked.set()
        windows.done(item_id)
        self._commit_wanted.set()

    async def _upload(self, windows: PartitionWindows, partition: int, obj: PendingObject) -> None:
        parking = self.runtime.parking
        async with self._slots:
            content_type = "application/json" if obj.kind == KIND_MANIFEST_PART else "application/gzip"
            # A tenant's own bucket failing parks the object (durable, in the service's bucket)
            # instead of holding this slot, the pending bytes and the commit point.
            delivery = await parking.put(self.topic, partition, obj, content_type)
        size = delivery.size
        windows.done(obj.id)
        self.pending_bytes -= obj.nbytes
        if self.pending_bytes <= self.max_pending_bytes:
            self._drained.set()
        status = self.status.get(partition)
        if status is not None:
            status.last_flush_at = time.time()
        self._commit_wanted.set()
        if obj.kind == KIND_MANIFEST_PART:
            self._manifest_checks.add(obj.start)
            return
        notice_fields = {**obj.describe(), "window_start": obj.start, "gzip_bytes": size, "partition": partition}
        if delivery.parked_key is not None:
            # Not in the tenant's bucket yet: a "redelivered" notice follows when it is.
            notice_fields.update(parking.notice_fields(delivery))
        else:
            self.objects_written += 1
            self.runtime.metrics.object_written(obj, size)
            notice_fields["status"] = "written"
        notice = orjson.dumps(notice_fields)
        self.runtime.spawn(
            self.runtime.app.producer.send(
                self.runtime.topics.objects.get_topic_name(), obj.key.encode(), notice, None, None, None
            )
        )

    # --------------------------------------------------------------- commits
    async def commit_loop(self) -> None:
        """Commit each partition's durable prefix, its checkpoint first."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._commit_wanted.wait(), timeout=1.0)
            self._commit_wanted.clear()
            started = time.monotonic()
            await self.commit_once()
            try:
                await self._compose_manifests()
            except Exception:  # never stop the commit loop: the next round checks again
                log.exception("sink: composing manifests failed")
            # At most one commit (one checkpoint PUT per partition) per interval: during a
            # catch-up uploads finish constantly, and a checkpoint per upload would double the writes.
            await asyncio.sleep(max(0.0, COMMIT_INTERVAL_SECONDS - (time.monotonic() - started)))

    async def commit_once(self) -> None:
        consumer = self.runtime.app.consumer
        bucket, prefix = self.manifest_target()
        offsets: dict[TP, int] = {}
        for partition, windows in list(self.partitions.items()):
            offset, checkpoint = windows.commit_point()
            status = self.status.get(partition)
            if status is None or offset <= status.committed_offset:
                continue
            key = checkpoint_key(prefix, self.settings.app_id, self.topic, partition, offset)
            body = orjson.dumps(checkpoint)
            await self.s3.put(bucket, key, lambda body=body: body, "application/json")
            offsets[TP(self.topic, partition)] = offset
        if not offsets:
            return
        await self.runtime.app.producer.flush()  # dead letters and notices before the offsets move
        if await consumer.commit_offsets(offsets):  # type: ignore[attr-defined]
            for tp, offset in offsets.items():
                status = self.status.get(tp.partition)
                if status is not None:
                    status.committed_offset = offset

    async def _compose_manifests(self) -> None:
        """A window is complete when every partition wrote its part: then write the manifest."""
        bucket, prefix = self.manifest_target()
        for start in sorted(self._manifest_checks):
            parts_prefix = manifest_parts_prefix(prefix, start)
            # Only the parts this service writes count: any other object under the prefix is ignored.
            expected = {
                f"{parts_prefix}{self.topic}-{partition}.json" for partition in range(self.settings.topic_partitions)
            }
            keys = [key for key in await self.s3.list_keys(bucket, parts_prefix) if key in expected]
            if len(keys) < len(expected):
                continue
            self._manifest_checks.discard(start)
            parts = []
            for key in sorted(keys):
                body = await self.s3.get(bucket, key)
                part = _manifest_part(key, body)
                if part is not None:
                    parts.append(part)
            objects = sorted((o for p in parts for o in p["objects"]), key=lambda o: o["key"])
            manifest = {
                "window_start": start,
                "complete": True,
                "partitions": len(parts),
                "objects": objects,
                "events": sum(o["events"] for o in objects),
                "bytes": sum(o["bytes"] for o in objects),
            }
            body = orjson.dumps(manifest, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
            await self.s3.put(bucket, manifest_key(prefix, start), lambda body=body: body, "application/json")

    # ----------------------------------------------------------------- ticks
    async def tick_idle_partitions(self) -> None:
        """Move the watermark of quiet, caught-up partitions forward, through the log itself.

        The tick is a record in the partition, so a replay sees it at the same place and
        closes the same windows: idle flushing without losing determinism.
        """
        consumer = self.runtime.app.consumer
        now = time.monotonic()
        for tp in consumer.assignment():
            # Assigned but never delivered (empty, or everything committed): its first tick
            # opens it here, so it writes manifest parts like the others.
            if tp.topic != self.topic or tp.partition in self.partitions:
                continue
            if now - self._unopened_ticks.get(tp.partition, 0.0) < self.settings.idle_flush_seconds:
                continue
            self._unopened_ticks[tp.partition] = now
            await self._send_tick(tp.partition)
        for partition, windows in list(self.partitions.items()):
            status = self.status.get(partition)
            if status is None:
                continue
            if windows.next_pos != status.seen_pos:  # records arrived since the last look
                status.seen_pos, status.last_message_at = windows.next_pos, now
            if now - status.last_message_at < self.settings.idle_flush_seconds:
                continue
            # A partition that never saw an event is ticked too: every window's manifest waits
            # for a part from every partition, and only a moving watermark writes parts.
            tp = TP(self.topic, partition)
            highwater = consumer.highwater(tp)
            if highwater is not None and highwater > windows.read_offset:
                continue  # not caught up: real events will move the watermark
            status.last_message_at = now
            await self._send_tick(partition)

    async def _send_tick(self, partition: int) -> None:
        """A signed watermark tick into ``partition`` (only signed ones are obeyed)."""
        value = orjson.dumps({"watermark": time.time()})
        headers = control_headers(self._control_secret, self.topic, partition, TICK_KEY, value)
        await self.runtime.app.producer.send(self.topic, TICK_KEY, value, partition, None, headers)

    # ----------------------------------------------------------------- views
    def _windows_backlog(self, partition: int, windows: PartitionWindows) -> dict[str, Any]:
        """``windows.backlog()`` (a pass over its open buffers: 50,000 with invented project ids)
        at most once per ``BACKLOG_CACHE_SECONDS``: the meter's health check, /sink/ and /metrics
        all read it."""
        now = time.monotonic()
        cached = self._backlog_cache.get(partition)
        if cached is not None and cached[1] is windows and now - cached[0] < BACKLOG_CACHE_SECONDS:
            return cached[2]
        info = windows.backlog()
        self._backlog_cache[partition] = (now, windows, info)
        return info

    def backlog(self) -> dict[str, Any]:
        consumer = self.runtime.app.consumer
        partitions = {}
        now = time.time()
        for partition, windows in sorted(self.partitions.items()):
            status = self.status.get(partition) or PartitionStatus()
            highwater = consumer.highwater(TP(self.topic, partition)) or 0
            info = self._windows_backlog(partition, windows)
            oldest = info.get("oldest_open_window")
            unflushed_age = max(0.0, now - oldest) if oldest is not None else 0.0
            partitions[str(partition)] = {
                **info,
                "committed_offset": status.committed_offset,
                "read_offset": windows.read_offset,
                "highwater": highwater,
                "offsets_behind": max(0, highwater - status.committed_offset),
                "read_lag": max(0, highwater - windows.read_offset),
                "oldest_unflushed_age_seconds": round(unflushed_age, 3),
                "last_flush_at": status.last_flush_at,
            }
        return partitions


def _manifest_part(key: str, body: bytes | None) -> dict[str, Any] | None:
    """A manifest part as the sink writes it, or None (logged) when the object is not one."""
    if body is None:
        return None
    try:
        part = orjson.loads(body)
    except orjson.JSONDecodeError:
        part = None
    objects = part.get("objects") if type(part) is dict else None
    if type(objects) is not list or not all(
        type(o) is dict and type(o.get("key")) is str and type(o.get("events")) is int and type(o.get("bytes")) is int
        for o in objects
    ):
        log.warning("sink: ignoring %s: not a manifest part", key)
        return None
    return part
