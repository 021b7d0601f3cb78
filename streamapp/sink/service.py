"""The S3 sink: carries out what the per-partition window state machines decide.

For each batch from the events topic it feeds records to ``PartitionWindows``,
uploads the objects that come out (in parallel, bounded), diverts excess to the
overflow topic, dead-letters invalid records, and commits a partition's offset
only after everything before it is durable and the checkpoint for that offset
is in S3. Consumption stalls (and Kafka fetching pauses) while too many bytes
are waiting for S3, so memory stays bounded whatever the backlog.

Its parts live beside it: ``checkpoints`` (open a partition where it was left, store the state
with each commit), ``manifests`` (a window's manifest once every partition wrote its part),
``diversions`` (the excess into the overflow lane), ``status`` (what the views read). The
service receives its collaborators explicitly (no runtime locator).

Size: ~490 lines, because the batch loop, control records, uploads, commits and idle ticks all drive the
same per-partition state (windows, status, pending bytes), and the batch loop (``handle_batch``,
calling ``_control`` and ``_dispatch``) is the sink's hot path measured by
``benchmarks/bench_sink.py``: it is kept in one class rather than spread over helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import faust
import orjson
from faust.types import TP, StreamT

from streamapp.contract import TICK_KEY, dead_letter_key, invalid_record_value, position, position_offset
from streamapp.control import (
    SHED_MODES,
    ShedMarker,
    Tick,
    control_headers,
    control_secrets,
    parse_control,
    verify_control,
)
from streamapp.metering.unknown import UNKNOWN_FLOW
from streamapp.settings import Settings
from streamapp.sink.checkpoints import CheckpointStore
from streamapp.sink.diversions import Diversions, overflow_record
from streamapp.sink.layout import KIND_MANIFEST_PART, Target
from streamapp.sink.manifests import ManifestComposer
from streamapp.sink.outputs import InvalidItem, PendingObject
from streamapp.sink.parking import Parking
from streamapp.sink.partition import PartitionWindows
from streamapp.sink.s3 import S3Writer
from streamapp.sink.status import BacklogReader, PartitionStatus
from streamapp.sink.uploads import FairQueue
from streamapp.sink.window_state import Route

if TYPE_CHECKING:
    from streamapp.control import ControlPlane
    from streamapp.metrics import Metrics
    from streamapp.overflow.lane import OverflowLane

log = logging.getLogger(__name__)
COMMIT_INTERVAL_SECONDS = 1.0
YIELD_EVERY_EVENTS = 5000  # ~20 ms of sink work on this project's machine


class S3Sink:
    def __init__(
        self,
        *,
        app: faust.App,
        settings: Settings,
        s3: S3Writer,
        checkpoints: CheckpointStore,
        parking: Parking,
        overflow: OverflowLane,
        control: ControlPlane,
        export_target: Callable[[str], Target | None],
        invalid_topic: str,
        overflow_topic: str,
        objects_topic: str,
        metrics: Metrics,
        spawn: Callable[[Awaitable[Any]], None],
    ) -> None:
        self.app = app  # its consumer (offsets, highwaters, commits, generation) and producer
        self.settings = settings
        self.s3 = s3
        self.checkpoints = checkpoints
        self.parking = parking  # a tenant's failing bucket: its objects are parked (sink/parking.py)
        self.control = control  # its view says which projects are created
        self.export_target = export_target
        self.invalid_topic = invalid_topic
        self.objects_topic = objects_topic
        self.metrics = metrics
        self.spawn = spawn
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
        self.backlog_reader = BacklogReader(self.topic)
        self.pending_bytes = 0
        self.max_pending_bytes = max(64 * 1024 * 1024, self.settings.max_object_bytes * 2)
        self._drained = asyncio.Event()
        self._drained.set()
        self._commit_wanted = asyncio.Event()
        self.manifests = ManifestComposer(
            s3, settings.s3_bucket, settings.s3_prefix, self.topic, settings.topic_partitions
        )
        self._unopened_ticks: dict[int, float] = {}  # partition -> monotonic time of its last tick
        self.invalid_out = 0
        self.objects_written = 0
        self.control_rejected = 0  # NUL-keyed records refused (unsigned, forged, misplaced)
        # The first signs this worker's ticks; any of them verifies (a rotation: control_records).
        self._control_secrets = control_secrets(self.settings.control_secret) or (b"",)
        self._control_secret = self._control_secrets[0]
        # Diversions have their own producer (streamapp.overflow.lane), never Faust's shared one.
        self.overflow = overflow
        self.diversions = Diversions(overflow, overflow_topic, self._control_secret)

    @property
    def events_in(self) -> int:
        """Events read by the partitions this worker holds now."""
        return sum(w.events_in for w in self.partitions.values())

    # ----------------------------------------------------------- partitions
    def manifest_target(self) -> Target:
        return (self.settings.s3_bucket, self.settings.s3_prefix)

    def target(self, project_id: str) -> Target | None:
        return self.export_target(project_id)

    def known(self, project_id: str) -> bool:
        """Created in the control plane (STREAMAPP_UNKNOWN_PROJECTS applies to the others)."""
        return project_id in self.control.view.projects

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
        committed, checkpoint = await self.checkpoints.open(
            self.app.consumer, tp, self.topic, lambda committed: {"position": position(committed)}
        )
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
        """The agent's loop: each item is one fetched batch of a partition (see streamapp.infra.transport).

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
        app = self.app
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
                await self.diversions.wait(tp.partition)
                if generation_id is not None and app.consumer_generation_id != generation_id:
                    break
                yield_at = windows.events_in + YIELD_EVERY_EVENTS
        if windows.offset_gaps != gaps:
            log.warning("sink partition %s: a gap in the offsets read (now at %s)", tp.partition, windows.read_offset)
        self._dispatch_if_owned(tp.partition, windows)
        await self.wait_for_s3()
        await self.diversions.wait(tp.partition)

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

    def _control(
        self, windows: PartitionWindows, offset: int, key: bytes, value: bytes | None, headers: Any = None
    ) -> None:
        """A NUL-keyed record: obeyed only when signed for this partition (streamapp.control.markers).

        Anything else is read past, counted and dead-lettered. Never raises, whatever the bytes.
        """
        before = windows.next_pos
        self._obey_control(windows, offset, key, value, headers)
        status = self.status.get(windows.partition)
        if status is not None and windows.next_pos != before:  # not a redelivery
            status.control_read += 1  # not an event: the partition may still be idle (ticks)

    def _obey_control(
        self, windows: PartitionWindows, offset: int, key: bytes, value: bytes | None, headers: Any
    ) -> None:
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
                self.metrics.control_rejected.inc()
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
        producer = self.app.producer
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
                self.spawn(producer.send(self.invalid_topic, key, value, None, None, None))
            self.invalid_out += len(windows.invalid)
            windows.invalid.clear()
        for batch in windows.diverted:
            value = overflow_record(partition, batch.offset, batch.timestamp_ms, batch.record)
            self.diversions.started(partition, len(value))
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
        await self.diversions.produce(partition, project, value)
        windows.done(item_id)
        self._commit_wanted.set()

    async def _upload(self, windows: PartitionWindows, partition: int, obj: PendingObject) -> None:
        parking = self.parking
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
            self.manifests.pending.add(obj.start)
            return
        notice_fields = {**obj.describe(), "window_start": obj.start, "gzip_bytes": size, "partition": partition}
        if delivery.parked_key is not None:
            # Not in the tenant's bucket yet: a "redelivered" notice follows when it is.
            notice_fields.update(parking.notice_fields(delivery))
        else:
            self.objects_written += 1
            self.metrics.object_written(obj, size)
            notice_fields["status"] = "written"
        notice = orjson.dumps(notice_fields)
        self.spawn(self.app.producer.send(self.objects_topic, obj.key.encode(), notice, None, None, None))

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
                await self.manifests.compose()
            except Exception:  # never stop the commit loop: the next round checks again
                log.exception("sink: composing manifests failed")
            # At most one commit (one checkpoint PUT per partition) per interval: during a
            # catch-up uploads finish constantly, and a checkpoint per upload would double the writes.
            await asyncio.sleep(max(0.0, COMMIT_INTERVAL_SECONDS - (time.monotonic() - started)))

    async def commit_once(self) -> None:
        consumer = self.app.consumer
        offsets: dict[TP, int] = {}
        for partition, windows in list(self.partitions.items()):
            offset, checkpoint = windows.commit_point()
            status = self.status.get(partition)
            if status is None or offset <= status.committed_offset:
                continue
            await self.checkpoints.save(self.topic, partition, offset, checkpoint)
            offsets[TP(self.topic, partition)] = offset
        if not offsets:
            return
        await self.app.producer.flush()  # dead letters and notices before the offsets move
        if await consumer.commit_offsets(offsets):  # type: ignore[attr-defined]
            for tp, offset in offsets.items():
                status = self.status.get(tp.partition)
                if status is not None:
                    status.committed_offset = offset

    # ----------------------------------------------------------------- ticks
    async def tick_idle_partitions(self) -> None:
        """Move the watermark of quiet, caught-up partitions forward, through the log itself.

        The tick is a record in the partition, so a replay sees it at the same place and
        closes the same windows: idle flushing without losing determinism.
        """
        consumer = self.app.consumer
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
            if windows.next_pos != status.seen_pos:  # records arrived since the last look ...
                read = position_offset(windows.next_pos) - position_offset(status.seen_pos)
                if read > status.control_read - status.seen_control:  # ... events, not only control records
                    status.last_message_at = now
                status.seen_pos, status.seen_control = windows.next_pos, status.control_read
            if now - status.last_message_at < self.settings.idle_flush_seconds:
                continue
            # A partition that never saw an event is ticked too: every window's manifest waits
            # for a part from every partition, and only a moving watermark writes parts.
            tp = TP(self.topic, partition)
            highwater = consumer.highwater(tp)
            if highwater is not None and highwater > windows.read_offset:
                continue  # not caught up: real events will move the watermark
            # Idle: a tick every ``idle_flush_seconds``, and one as soon as the wall clock passes
            # the oldest open window's close (the last window of a burst is written a timer
            # interval after it may be, not up to twice the idle flush later).
            next_close, wall = windows.next_close, time.time()
            closable = next_close <= wall and next_close != status.ticked_close
            if now - status.last_tick_at < self.settings.idle_flush_seconds and not closable:
                continue
            status.last_tick_at = now
            if next_close <= wall:
                status.ticked_close = next_close  # this tick closes it: not sent again for it
            await self._send_tick(partition)

    async def _send_tick(self, partition: int) -> None:
        """A signed watermark tick into ``partition`` (only signed ones are obeyed)."""
        value = orjson.dumps({"watermark": time.time()})
        headers = control_headers(self._control_secret, self.topic, partition, TICK_KEY, value)
        await self.app.producer.send(self.topic, TICK_KEY, value, partition, None, headers)

    # ----------------------------------------------------------------- views
    def backlog(self) -> dict[str, Any]:
        """Per partition: its windows' backlog, offsets and lag (see streamapp.sink.status)."""
        return self.backlog_reader.rows(self.partitions, self.status, self.app.consumer)
