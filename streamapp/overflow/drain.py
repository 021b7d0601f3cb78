"""The overflow drain service: a shed project's excess from the overflow topic into S3, paced, exactly once.

``OverflowChunks`` (streamapp.overflow.chunks) cuts each overflow partition into deterministic
chunks; this service (fed by the ``overflow-drain`` agent, streamapp.agents.drain) writes the
"delayed" objects of up to ``CHUNKS_PER_DELIVERY`` ready chunks at once (same layout as the
real-time objects, ``-d{partition}-o{offset}-delayed`` suffix) into the project's export target,
then the checkpoint for the offset after the last of them, then commits that offset. After a
crash or rebalance the partition is restored from the checkpoint at the committed offset.
The events of a diverted record that the real-time path would have dead-lettered are
dead-lettered from here (``events-invalid``, naming the events-topic record).

Pacing (``metering.Pacer``): after a delivery (of any partition: they take turns) the drain waits
``events / allowance`` seconds, counted from when it began reading those events, at the allowance
in force while it waits (re-read every ``PACE_RECHECK_SECONDS``); ready chunks are delivered as
they come, each delivery in the background while the drain reads on, the next one waiting for it
(``_deliver_ready``); the allowance is ``overflow_max_eps`` while the real-time sink has had no
backlog for a few seconds and falls linearly to ``overflow_floor_fraction`` (5 %) of it as the
sink's backlog age reaches ``health_backlog_seconds`` (the worst age of the last few seconds,
forgotten once the sink is idle: no open window, nothing unread). The drain waits inside its
agent's loop, so its Faust buffer fills and Faust stops fetching the overflow partitions
(per-partition flow control) while the events partitions flow on. The overflow topic is read in
bulk (one buffer item per fetched batch, see streamapp.topics), so what was fetched before the
stop always fits in the buffer: a full buffer would block Faust's delivery to every agent.
Nothing is skipped, only delayed.

Size: ~410 lines, because the reading (signatures, the export pool one batch ahead), the pacing and
the deliveries share one state: the partitions held, their committed offsets, deliveries in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import faust
import orjson
from faust.types import TP, EventT

from streamapp.contract import TICK_KEY, dead_letter_key, invalid_record_value
from streamapp.control import control_headers, control_secrets, verify_control
from streamapp.metering import Pacer, sink_backlog_age, sink_is_idle
from streamapp.overflow.chunks import Chunk, OverflowChunks
from streamapp.overflow.export import RecordLines
from streamapp.overflow.pool import ExportPool
from streamapp.settings import Settings
from streamapp.sink import CheckpointStore, Parking, Target

if TYPE_CHECKING:
    from streamapp.metrics import Metrics

log = logging.getLogger(__name__)

#: A fetched batch's records with why each is forged (None: signed), and its diverted records' lines.
Exported = tuple[list[tuple[Any, str | None]], "asyncio.Future[dict[int, RecordLines]] | None"]

CHUNK_MAX_EVENTS = 5000
CHUNK_MAX_BYTES = 8 * 1024 * 1024
#: Ready chunks of one partition delivered together (their objects written at once, one checkpoint
#: and one commit): per chunk, those round trips held the drain to ~8,000 events/s.
CHUNKS_PER_DELIVERY = 4
#: The drain yields to the event loop after this many bytes of overflow records: a fetch of 16
#: batches is up to ~100,000 pageviews with add-ons, ~2 s of the loop read in one go.
YIELD_EVERY_BYTES = 256 * 1024
#: While paced, the drain re-reads the sink's backlog this often: the allowance follows it.
PACE_RECHECK_SECONDS = 0.25


class OverflowDrain:
    """Delivers the overflow partitions this worker holds, a few chunks at a time; its ``status()`` is the
    drain's read model (views, metrics)."""

    def __init__(
        self,
        *,
        app: faust.App,
        settings: Settings,
        topic: str,
        objects_topic: str,
        events_topic: str,
        invalid_topic: str,
        checkpoints: CheckpointStore,
        parking: Parking,
        export_target: Callable[[str], Target | None],
        sink_backlog: Callable[[], dict[str, dict[str, Any]]],
        metrics: Metrics,
        spawn: Callable[[Awaitable[Any]], asyncio.Future[Any]],
        pool: ExportPool | None = None,
    ) -> None:
        self.app = app  # its consumer (offsets, highwaters, commits) and producer (notices, ticks)
        self.settings = settings
        self.topic = topic
        self.objects_topic = objects_topic
        self.events_topic = events_topic  # where diverted records were read (named in dead letters)
        self.invalid_topic = invalid_topic
        self.checkpoints = checkpoints
        self.parking = parking  # a project's own bucket failing parks its objects (sink/parking.py)
        self.export_target = export_target
        self.sink_backlog = sink_backlog  # the real-time sink's backlog: it paces the drain
        self.metrics = metrics
        self.spawn = spawn
        self.pool = pool  # exports diverted records in other processes (STREAMAPP_DRAIN_PROCESSES)
        self.partitions: dict[int, OverflowChunks] = {}
        self.committed: dict[int, int] = {}
        self.last_record_at: dict[int, float] = {}
        self.tick_sent_for: dict[int, int] = {}  # partition -> next_offset when the last tick was sent
        self.pacer = Pacer(self.settings.overflow_max_eps, self.settings.overflow_floor_fraction)
        self._control_secrets = control_secrets(self.settings.control_secret) or (b"",)
        self.delayed_objects = 0
        self.dead_lettered = 0
        self.events_delivered = 0
        self.chunks = 0
        self.paced_seconds = 0.0
        self._rate_window: list[tuple[float, int]] = []  # (time, events) of recent chunks
        self._delivering: dict[int, asyncio.Future[Any]] = {}  # partition -> its delivery in flight

    async def partition(self, tp: TP) -> OverflowChunks:
        chunks = self.partitions.get(tp.partition)
        if chunks is not None:
            return chunks
        committed, checkpoint = await self.checkpoints.open(
            self.app.consumer, tp, self.topic, lambda committed: {"offset": committed}, lane="drain: "
        )
        chunks = OverflowChunks(
            self.topic,
            tp.partition,
            window_seconds=self.settings.window_seconds,
            max_events=CHUNK_MAX_EVENTS,
            max_bytes=CHUNK_MAX_BYTES,
            target=self.export_target,
            checkpoint=checkpoint,
            max_record_bytes=self.settings.max_record_bytes,
            max_event_bytes=self.settings.max_event_bytes,
            max_future_seconds=self.settings.max_future_seconds,
        )
        self.partitions[tp.partition] = chunks
        self.committed[tp.partition] = committed or 0
        log.info("drain: partition %s opened at offset %s", tp.partition, committed)
        return chunks

    def start_pool(self) -> None:
        """At the worker's start: the export pool's processes start (in the background)."""
        if self.pool is not None and not self.pool.started:
            self.pool.start()

    def close(self) -> None:
        """At the worker's shutdown: the export pool's processes exit."""
        if self.pool is not None:
            self.pool.close()

    def revoke(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            if tp.topic == self.topic:
                self.partitions.pop(tp.partition, None)
                self.committed.pop(tp.partition, None)
        self.pacer.reset()

    # ---------------------------------------------------------------- input
    async def handle(self, events: list[EventT]) -> None:
        """Each event is one fetched batch of an overflow partition: a RecordBatch of raw records
        in offset order (the overflow topic is read in bulk, see streamapp.topics).

        Ready chunks are delivered as soon as ``CHUNKS_PER_DELIVERY`` of them are (paced), not after
        the whole take: the reading is paced with the writing, so a paced drain never reads a
        burst of ~100,000 events (seconds of this worker's loop) while the real-time path is behind."""
        touched: dict[int, OverflowChunks] = {}
        revoked: set[int] = set()  # revoked while this batch was read: the new owner replays it
        working_since: dict[int, float] = {}  # partition -> when the reading of its ready chunks began
        now = time.monotonic()
        unyielded = 0
        ahead: tuple[EventT, Exported] | None = None  # the next batch, its export started early
        for index, event in enumerate(events):
            message = event.message
            partition = message.partition
            if partition in revoked:
                continue
            chunks = touched.get(partition)
            if chunks is None:
                chunks = touched[partition] = await self.partition(message.tp)
            working_since.setdefault(partition, time.monotonic())
            checked, lines = ahead[1] if ahead is not None and ahead[0] is event else self._export(event, chunks)
            # The pool exports the next batch while this one is applied (one batch ahead at most).
            following = events[index + 1] if index + 1 < len(events) and lines is not None else None
            following_chunks = self.partitions.get(following.message.partition) if following is not None else None
            ahead = None
            if following is not None and following_chunks is not None:
                ahead = (following, self._export(following, following_chunks))
            exported = await lines if lines is not None else {}
            if self.partitions.get(partition) is not chunks:
                revoked.add(partition)
                continue
            for record, forged in checked:
                self._record(chunks, message.tp, record, forged, exported.get(record.offset))
                unyielded += len(record.value or b"")
                if unyielded >= YIELD_EVERY_BYTES:
                    unyielded = 0
                    await asyncio.sleep(0)  # the real-time path's turn
                    if self.partitions.get(partition) is not chunks:
                        revoked.add(partition)
                        break
            self.last_record_at[partition] = now
            if partition not in revoked and len(chunks.ready) >= CHUNKS_PER_DELIVERY:
                await self._deliver_ready(partition, chunks, working_since.pop(partition), whole=True)
        for partition, chunks in touched.items():
            if partition not in revoked:
                await self._deliver_ready(partition, chunks, working_since.pop(partition, time.monotonic()))

    async def _deliver_ready(
        self, partition: int, chunks: OverflowChunks, working_since: float, whole: bool = False
    ) -> None:
        """Deliver ``chunks.ready`` in groups of ``CHUNKS_PER_DELIVERY`` (``whole``: only full groups, the
        rest waits for more); ``working_since``: when the drain began reading them (``Pacer.started``).

        A partition's deliveries run one at a time, in order, each in the background while the
        drain reads on: the next group waits for the previous delivery (its pacing included), so
        the reading stays paced and at most one group is read ahead, and the S3 round trips of a
        delivery overlap the reading of the next (~23,000 events/s after a spike without that,
        with the 32,000 allowed)."""
        self._dead_letter(chunks)
        ready = chunks.ready
        n = len(ready) - len(ready) % CHUNKS_PER_DELIVERY if whole else len(ready)
        batch, chunks.ready = ready[:n], ready[n:]
        for start in range(0, n, CHUNKS_PER_DELIVERY):
            await self.delivered(partition)
            if self.partitions.get(partition) is not chunks:
                return  # revoked meanwhile: the new owner replays from the committed offset
            group = batch[start : start + CHUNKS_PER_DELIVERY]
            # Logged by the worker's background tasks as it fails; raised at the next delivery.
            self._delivering[partition] = self.spawn(self.deliver(group, working_since))

    async def delivered(self, partition: int) -> None:
        """Wait for ``partition``'s delivery in flight, if any; its failure is raised here."""
        task = self._delivering.pop(partition, None)
        if task is not None:
            await task

    def _export(self, event: EventT, chunks: OverflowChunks) -> Exported:
        """A fetched batch's records, each with why it is not a worker's signed record of this
        partition (None: it is; only those are obeyed, anything else could claim source positions or
        cut chunks), and the pool's export of its signed diverted records, started now (None: no pool)."""
        tp = event.message.tp
        secrets = self._control_secrets
        checked = [
            (r, verify_control(secrets, self.topic, tp.partition, r.key or b"", r.value, r.headers))
            for r in event.value
        ]
        if self.pool is None:
            return checked, None
        return checked, self.pool.lines_for([r for r, forged in checked if forged is None], chunks.next_offset)

    def _record(
        self, chunks: OverflowChunks, tp: TP, record: Any, forged: str | None, lines: RecordLines | None
    ) -> None:
        """One overflow record: read past if ``forged`` (``_export``), else obeyed (``lines``: its
        export by the pool, if it was exported there)."""
        if forged is not None:
            chunks.reject(record.offset)
            if chunks.forged <= 10:
                log.warning("drain: %s at %s offset %s; skipped", forged, tp, record.offset)
            return
        key = record.key
        try:
            chunks.process(record.offset, key, record.value, lines)
        except Exception as exc:  # noqa: BLE001 - a record can only ever cost itself: never stop the drain
            chunks.invalid += 1
            log.warning(
                "drain: overflow record at %s offset %s failed (%s: %.200s); skipped",
                tp,
                record.offset,
                type(exc).__name__,
                exc,
            )

    def _dead_letter(self, chunks: OverflowChunks) -> None:
        """Events of diverted records that the real-time path would have dead-lettered: the same
        dead letter, naming the events-topic record they came from."""
        producer = self.app.producer
        for source_partition, item in chunks.dead_letters:
            value = invalid_record_value(
                item.reason,
                topic=self.events_topic,
                partition=source_partition,
                offset=item.offset,
                key=item.key,
                value=item.value,
            )
            self.spawn(producer.send(self.invalid_topic, dead_letter_key(item.key), value, None, None, None))
        self.dead_lettered += len(chunks.dead_letters)
        chunks.dead_letters.clear()

    def sink_pressure(self) -> tuple[float, bool]:
        """(the real-time sink's backlog age, whether it is idle: ``metering.sink_is_idle``)."""
        s = self.settings
        try:
            backlog = self.sink_backlog()
        except Exception:  # noqa: BLE001 - no signal yet
            return 0.0, False
        hold = s.window_seconds + s.allowed_lateness_seconds + s.idle_flush_seconds
        return sink_backlog_age(backlog, hold, time.time()), sink_is_idle(backlog)

    async def deliver(self, batch: list[Chunk], working_since: float | None = None) -> None:
        """Pace, write the objects of consecutive chunks of one partition at once, then the last
        chunk's checkpoint, then commit its offset.

        One checkpoint and one commit for the lot: the offsets between are never committed, so no
        checkpoint is needed for them. A crash before the commit replays from the previous one and
        cuts the same chunks again (cuts are a function of the log): the same keys, the same bytes.
        """
        events = sum(chunk.events for chunk in batch)
        if events:
            await self.pace(events, working_since)
        last = batch[-1]
        objects = [obj for chunk in batch for obj in chunk.objects]
        parking = self.parking
        deliveries = await asyncio.gather(
            *(parking.put(self.topic, last.partition, obj, "application/gzip") for obj in objects)
        )
        await self.checkpoints.save(self.topic, last.partition, last.commit_offset, last.checkpoint)
        producer = self.app.producer
        for obj, delivery in zip(objects, deliveries, strict=True):
            if delivery.parked_key is None:
                self.metrics.object_written(obj, delivery.size)
            fields = {**obj.describe(), "gzip_bytes": delivery.size, "partition": last.partition}
            notice = orjson.dumps({**fields, **parking.notice_fields(delivery)})
            self.spawn(producer.send(self.objects_topic, obj.key.encode(), notice, None, None, None))
        tp = TP(self.topic, last.partition)
        if await self.app.consumer.commit_offsets({tp: last.commit_offset}):  # type: ignore[attr-defined]
            self.committed[last.partition] = last.commit_offset
        self.delayed_objects += len(objects)
        self.events_delivered += events
        self.chunks += len(batch)
        now = time.monotonic()
        self._rate_window.append((now, events))
        self._rate_window = [(t, n) for t, n in self._rate_window if now - t <= 10.0]

    async def pace(self, events: int, working_since: float | None = None) -> None:
        """Wait for the share of the drain's previous delivery, then start this one's (``Pacer``).

        Deliveries of several partitions wait at once (each in the background): the first to find
        its wait over starts its share with no await in between, so the others then wait for that
        share too, and the drain as a whole keeps to its allowance."""
        threshold = self.settings.health_backlog_seconds
        while True:
            age, idle = self.sink_pressure()
            if idle:  # the ages remembered would only hold the drain back from an idle sink
                self.pacer.forget_ages()
            wait = self.pacer.wait_seconds(time.monotonic(), age, threshold)
            if wait <= 0:
                break
            step = min(wait, PACE_RECHECK_SECONDS)
            self.paced_seconds += step
            await asyncio.sleep(step)
        self.pacer.started(events, time.monotonic(), working_since)

    # ---------------------------------------------------------------- ticks
    async def tick_idle_partitions(self) -> None:
        """Cut a pending chunk of a quiet, caught-up partition with a tick record in its log."""
        consumer = self.app.consumer
        now = time.monotonic()
        for partition, chunks in list(self.partitions.items()):
            if not chunks.pending_events:
                continue
            if now - self.last_record_at.get(partition, now) < self.settings.idle_flush_seconds:
                continue
            if self.tick_sent_for.get(partition) == chunks.next_offset:
                continue  # already ticked at this position; wait for it to come back
            highwater = consumer.highwater(TP(self.topic, partition))
            if highwater is not None and highwater > chunks.next_offset:
                continue  # more records to read first
            self.tick_sent_for[partition] = chunks.next_offset
            value = orjson.dumps({"at": time.time()})
            headers = control_headers(self._control_secrets[0], self.topic, partition, TICK_KEY, value)
            await self.app.producer.send(self.topic, TICK_KEY, value, partition, None, headers)

    # ---------------------------------------------------------------- views
    def status(self) -> dict[str, Any]:
        consumer = self.app.consumer
        partitions = {}
        for partition, chunks in sorted(self.partitions.items()):
            highwater = consumer.highwater(TP(self.topic, partition)) or 0
            committed = self.committed.get(partition, 0)
            partitions[str(partition)] = {
                "committed_offset": committed,
                "read_offset": chunks.next_offset,
                "highwater": highwater,
                "offsets_behind": max(0, highwater - committed),
                "pending_events": chunks.pending_events,
                "duplicates_skipped": chunks.duplicates,
                "forged_skipped": chunks.forged,
            }
        now = time.monotonic()
        recent = [(t, n) for t, n in self._rate_window if now - t <= 10.0]
        rate = sum(n for _, n in recent) / 10.0 if recent else 0.0
        return {
            "partitions": partitions,
            "offsets_behind": sum(p["offsets_behind"] for p in partitions.values()),
            "rate_eps": round(rate, 1),
            "allowance_eps": round(
                self.pacer.allowance(
                    now, self.pacer.recent_age(now, self.sink_pressure()[0]), self.settings.health_backlog_seconds
                ),
                1,
            ),
            "delayed_objects": self.delayed_objects,
            "dead_lettered": self.dead_lettered,
            "events_delivered": self.events_delivered,
            "chunks": self.chunks,
            "paced_seconds": round(self.paced_seconds, 3),
            "export_pool": self.pool.status() if self.pool is not None else None,
        }
