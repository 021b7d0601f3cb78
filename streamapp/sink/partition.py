"""Event-time tumbling windows of one source partition, as a deterministic state machine.

No I/O here: the sink agent feeds records in log order and carries out what comes
out (objects to upload, excess to divert, invalid records to dead-letter). Every
decision is a function of the log from the last checkpoint, which is what makes
objects exactly-once: after a crash the sink restores the checkpoint stored with
the committed offset, replays, and produces the same keys with the same bytes.

Why each piece of the checkpoint is needed:

* ``position``: everything before it is durable in S3, so replayed events before
  it are skipped (a batch record can straddle the commit point).
* ``watermark``: late/on-time and window closing must be decided as before.
* ``routes``: the shed markers in force (they come from the log, see ``marker``).
* ``parts_written``: windows whose manifest part is durable but which the replay closes
  again: the part is not rewritten (without the objects the replay skips).
* ``windows[S].skip_below``: windows flushed after the commit point; their admitted
  events in the replay range are already in S3 and must not be written again. A
  diverted record after the position is diverted again (whether its first produce
  landed is unknown); the drain delivers each source offset once.

Size: one module of ~590 lines, because ``PartitionWindows`` is one state machine whose input, windowing,
durability and checkpoint methods all read and write the same state; splitting the class would
spread its invariants over files (and put attribute lookups through a base class on the hot
path, ``process``, which ``benchmarks/bench_sink.py`` measures). Its data types live beside it:
``window_state`` (what it keeps) and ``outputs`` (what it hands to the sink service).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from streamapp.contract import (
    END_EVENT_SECONDS,
    MAX_FUTURE_SKEW_SECONDS,
    MIN_EVENT_SECONDS,
    InvalidRecord,
    RecordStamps,
    check_identity,
    enrich_event,
    event_time_in_range,
    parse_record,
    position,
    position_offset,
    record_stamps,
    scan_batch,
)
from streamapp.enrichment import AddonError, dead_letter_bytes, run_addons
from streamapp.metering.shed import admit_event
from streamapp.metering.unknown import shared_meter_id
from streamapp.sink.layout import (
    KIND_EARLY,
    KIND_EARLY_LATER,
    KIND_LATE,
    KIND_LATE_OLDER,
    KIND_MANIFEST_PART,
    KIND_ON_TIME,
    Target,
    manifest_part_key,
    object_key,
)
from streamapp.sink.outputs import DivertedBatch, InvalidItem, PendingObject
from streamapp.sink.window_state import Buffer, FlushesAfterCommit, Route, RouteCounts, Snapshot, WindowManifest

_NEG_INF = float("-inf")
# Windows closed in one watermark jump that still get an (empty) manifest part.
MAX_EMPTY_PARTS_PER_ADVANCE = 12
# Late events of the most recent closed windows get one object per window at each flush; late
# events of older windows share one "late-older" object (per project and collection), filed
# under the window before those: a flush writes at most LATE_WINDOWS + 1 late objects per
# project and collection, however many past windows the events are spread over. Likewise for
# events stamped ahead ("early", within max_future_seconds): LATE_WINDOWS windows past their
# record's own, then one "early-later" object filed under the window LATE_WINDOWS ahead.
LATE_WINDOWS = 8
DEFAULT_MAX_FUTURE_SECONDS = 3600.0


#: Bodies up to this size are copied into exact-size bytes when their object is emitted.
SMALL_BODY_BYTES = 4096


class PartitionWindows:
    def __init__(
        self,
        topic: str,
        partition: int,
        *,
        window_seconds: int,
        lateness: int,
        max_object_bytes: int,
        max_event_bytes: int,
        max_record_bytes: int,
        target: Callable[[str], Target | None],
        manifest_target: Target,
        checkpoint: Mapping[str, Any] | None = None,
        max_future_seconds: float = DEFAULT_MAX_FUTURE_SECONDS,
        known: Callable[[str], bool] | None = None,
        unknown_policy: str = "export",
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.size = window_seconds
        self.lateness = lateness
        self.max_object_bytes = max_object_bytes
        self.max_event_bytes = max_event_bytes
        self.max_record_bytes = max_record_bytes
        self.max_future_seconds = max_future_seconds
        self.target = target
        self.manifest_target = manifest_target
        # STREAMAPP_UNKNOWN_PROJECTS (streamapp.metering.unknown): ``known`` reads the control view,
        # like ``target``. Unknown projects follow the shared meter's route, or are dead-lettered.
        self.known = known or (lambda project_id: True)
        self.dead_letter_unknown = unknown_policy == "dead-letter"
        self.shared_id = shared_meter_id(partition)
        self.watermark = _NEG_INF
        self.routes: Mapping[str, Route] = {}
        self._last_snapshot = Snapshot(self.watermark, self.routes)
        self.skip_pos = 0
        self.next_pos = 0
        self.open: dict[tuple[str, str, int], Buffer] = {}
        self.late: dict[tuple[str, str, int], Buffer] = {}
        self.flushes: dict[tuple[str, str, int], FlushesAfterCommit] = {}
        self.skip: dict[int, dict[tuple[str, str], int]] = {}  # start -> (project, collection) -> position
        self.windows: dict[int, WindowManifest] = {}
        self.inflight: dict[int, PendingObject | DivertedBatch] = {}
        self._ids = itertools.count(1)
        self._next_close = float("inf")  # watermark at which the oldest open window closes
        self._last_closed_start: int | None = None
        # Outputs, drained by the agent after each batch.
        self.outbox: list[PendingObject] = []
        self.diverted: list[DivertedBatch] = []
        self.invalid: list[InvalidItem] = []
        self.counts: dict[str, RouteCounts] = {}
        self.events_in = 0
        self.offset_gaps = 0  # records skipped by the delivery (see _advance_read)
        self.future_corrected = 0  # events stamped too far ahead, windowed at their record's time
        self.records_failed = 0  # records whose handling raised (see reject)
        self.last_event_time = _NEG_INF
        if checkpoint:
            self._restore(checkpoint)

    # ----------------------------------------------------------------- input
    def process(self, offset: int, timestamp_ms: int, key: bytes | None, value: bytes | None) -> None:
        """One events-topic record (not a control record), in log order."""
        base = position(offset)
        if not self._advance_read(offset):
            return
        if self.routes and key and base >= self.skip_pos and self._divert_unparsed(offset, timestamp_ms, key, value):
            return
        try:
            record = parse_record(value, self.max_record_bytes)
            if key is None or key != record.project_id.encode():
                check_identity(key, record.project_id)  # raises, with the reason
        except InvalidRecord as exc:
            if base >= self.skip_pos:
                self.invalid.append(InvalidItem(offset, key, value, exc.reason))
            return
        project, collection = record.project_id, record.collection
        if self.dead_letter_unknown and not self.known(project):
            if base >= self.skip_pos:
                self.invalid.append(InvalidItem(offset, key, value, f"unknown project {project!r}: not created"))
            return
        target = self.target(project)
        route = self._route_for(project) if self.routes else None  # usually none: nothing is shed
        counts = self._route_counts(project)
        # A shed project's records are sampled whole, by record position (deterministic on replay).
        excess = route.mode if route is not None and not admit_event(base, route.fraction) else None
        if excess == "divert":
            if base >= self.skip_pos:
                assert value is not None  # parse_record accepted it
                self._divert(offset, timestamp_ms, project, value, len(record.events), counts)
                return
            # Before the restored commit point: diverted and acknowledged before the commit (a
            # diverted record holds the commit point at its position until then). Only a checkpoint
            # of a version that diverted event by event can fall inside a shed record: its events
            # past the point are exported on time here, never lost (at worst also delivered once by
            # the drain).
            excess = None
        watermark = self.watermark
        size = self.size
        late_edge = watermark - size - self.lateness  # windows starting at or before this are closed
        record_seconds = timestamp_ms / 1000.0
        time_cap = record_seconds + MAX_FUTURE_SKEW_SECONDS
        future_cap = record_seconds + self.max_future_seconds
        # Windows starting past this are ahead of the record: their events are written at the next
        # flush (like late ones), so an event stamped ahead never holds the commit point open.
        early_edge = record_seconds + self.lateness
        # ... and those more than LATE_WINDOWS windows ahead share one "early-later" object.
        later_start = int(record_seconds // size) * size + LATE_WINDOWS * size
        # Late windows at or before this share one object (see LATE_WINDOWS); none before any event.
        older_start = int(late_edge // size) * size - LATE_WINDOWS * size if late_edge != _NEG_INF else _NEG_INF
        max_time = _NEG_INF
        unexported = False
        stamps: RecordStamps | None = None
        skip = self.skip
        pc = (project, collection)
        dumps = orjson.dumps
        newline = orjson.OPT_APPEND_NEWLINE
        for index, event in enumerate(record.events):
            pos = base | index
            if pos < self.skip_pos:
                continue
            if type(event) is not dict:
                self.invalid.append(InvalidItem(offset, key, dumps(event), f"event {index} is not an object"))
                continue
            if target is None and route is None:
                counts.admitted += 1
                unexported = True
                continue  # not exported: nothing to write
            if stamps is None:
                stamps = record_stamps(self.partition, offset, timestamp_ms)
            event_time = enrich_event(event, index, stamps)
            if event_time > future_cap:
                # A client clock far ahead: window it at the record's time, keep the client's value.
                event["keen"]["window_timestamp"] = stamps.created_at
                event_time = stamps.seconds
                self.future_corrected += 1
            if not MIN_EVENT_SECONDS <= event_time < END_EVENT_SECONDS:  # event_time_in_range, inlined
                self.invalid.append(
                    InvalidItem(offset, key, dumps(event), f"event {index} time {event_time} is outside 1970-9999")
                )
                continue
            if "addons" in event["keen"]:  # one dict lookup: events without add-ons pay nothing more
                try:
                    run_addons(event)
                except AddonError as exc:
                    line = dead_letter_bytes(event, value)
                    self.invalid.append(InvalidItem(offset, key, line, f"event {index}: {exc.reason}"))
                    continue
            line = dumps(event, option=newline)
            if len(line) > self.max_event_bytes:
                self.invalid.append(
                    InvalidItem(offset, key, line, f"event {index} of {len(line)} bytes is over {self.max_event_bytes}")
                )
                continue
            capped = event_time if event_time < time_cap else time_cap
            if capped > max_time:
                max_time = capped
            start = int(event_time // size) * size
            late = start <= late_edge
            if late and start <= older_start:
                start = older_start  # a long-closed window: the shared "late-older" object
            early = not late and start > early_edge
            if early and start >= later_start:
                start = later_start
            if excess is not None:
                if excess == "drop":
                    counts.dropped += 1
                    continue
                counts.shadow_excess += 1  # shadow: decide and count, change nothing
            if skip:
                skip_below = skip.get(start)
                if skip_below is not None and pos < skip_below.get(pc, 0):
                    continue  # already in S3 before the crash/restart
            counts.admitted += 1
            if target is None:
                continue
            buffers = self.late if late or early else self.open
            buf = buffers.get((project, collection, start))
            if buf is None:
                if late:
                    kind = KIND_LATE_OLDER if start == older_start else KIND_LATE
                else:
                    kind = (KIND_EARLY_LATER if start == later_start else KIND_EARLY) if early else KIND_ON_TIME
                # One string per collection name, not one per buffer (they live until uploaded).
                buf = buffers[(project, collection, start)] = Buffer(
                    project, sys.intern(collection), start, kind, target, pos, self._snapshot()
                )
                if not (late or early) and start + size + self.lateness < self._next_close:
                    self._next_close = start + size + self.lateness
            buf.data += line
            buf.events += 1
            buf.last_pos = pos
            if buf.nbytes >= self.max_object_bytes:
                # Size rotation: cut here; the window's next event starts a new object.
                del buffers[(project, collection, start)]
                self._emit(buf, pos + 1)
        self.events_in += len(record.events)
        if unexported:
            # Events of a project that does not export still tell the time: without this, a partition
            # busy with only such traffic is never idle-ticked and no window's manifest completes.
            record_time = timestamp_ms / 1000.0
            if record_time > max_time and event_time_in_range(record_time):
                max_time = record_time
        if max_time > watermark:
            self.last_event_time = max_time
            self._advance(max_time, position(offset + 1))

    def _divert_unparsed(self, offset: int, timestamp_ms: int, key: bytes, value: bytes | None) -> bool:
        """Divert a shed project's record that its route's sample sends to the overflow lane, with
        its envelope and identity checked by ``contract.scan_batch`` (no event objects built): True
        if it did. Anything else (admitted, one-event, invalid, a record scan_batch is unsure of)
        returns False and ``process`` parses it like any record, with the same outcome as before."""
        try:
            project = key.decode()
        except UnicodeDecodeError:
            return False
        route = self._route_for(project)
        if route is None or route.mode != "divert" or admit_event(position(offset), route.fraction):
            return False
        if value is None or len(value) > self.max_record_bytes:
            return False
        envelope = scan_batch(value)
        if envelope is None or envelope.project_id != project:
            return False
        if self.dead_letter_unknown and not self.known(project):
            return False
        self._divert(offset, timestamp_ms, project, value, envelope.events, self._route_counts(project))
        return True

    def _route_for(self, project: str) -> Route | None:
        """The shed route in force for ``project``: its own, else the shared one if it is unknown."""
        routes = self.routes
        route = routes.get(project)
        if route is None and self.shared_id in routes and not self.known(project):
            route = routes[self.shared_id]  # unknown projects are shed as one
        return route

    def _route_counts(self, project: str) -> RouteCounts:
        counts = self.counts.get(project)
        if counts is None:
            counts = self.counts[project] = RouteCounts()
        return counts

    def _divert(
        self, offset: int, timestamp_ms: int, project: str, value: bytes, events: int, counts: RouteCounts
    ) -> None:
        """A shed project's excess record: to the overflow lane whole, as read (see ``DivertedBatch``).

        Its envelope and identity are checked; its events are checked, enriched and windowed by
        the drain. After a restart it is diverted again (whether its first produce landed is not
        known); the drain delivers each source offset once.
        """
        self.events_in += events
        counts.diverted += events
        batch = DivertedBatch(next(self._ids), project, offset, timestamp_ms, value, events, self._snapshot())
        self.inflight[batch.id] = batch
        self.diverted.append(batch)
        # Its record time still tells the partition's time (as for a project that does not export).
        record_time = timestamp_ms / 1000.0
        if record_time > self.watermark and event_time_in_range(record_time):
            self.last_event_time = record_time
            self._advance(record_time, position(offset + 1))

    def tick(self, offset: int, watermark: float) -> None:
        """A watermark tick written into this partition when it was idle and caught up."""
        if not self._advance_read(offset):
            return
        if not event_time_in_range(watermark):
            return  # no worker writes such a tick: read past it, it must not close every window
        self._advance(watermark, self.next_pos, flush_late=True)

    def reject(self, offset: int, key: bytes | None, value: bytes | None, reason: str) -> None:
        """A record whose handling raised: read past it and dead-letter it (once, also on replay).

        The sink's safety net: whatever a record contains, it costs only itself.
        """
        self._advance_read(offset)
        self.records_failed += 1
        if position(offset) >= self.skip_pos:
            self.invalid.append(InvalidItem(offset, key, value, reason))

    def marker(self, offset: int, project_id: str, route: Route | None) -> None:
        """A shed marker: from here on, route ``project_id``'s events by ``route``."""
        if not self._advance_read(offset):
            return
        routes = dict(self.routes)
        if route is None:
            routes.pop(project_id, None)
        else:
            routes[project_id] = route
        self.routes = routes  # copy on write: snapshots keep the old mapping

    @property
    def next_close(self) -> float:
        """The watermark at which the oldest open window closes (inf: none open)."""
        return self._next_close

    @property
    def read_offset(self) -> int:
        """The next offset of the partition to read."""
        return position_offset(self.next_pos)

    def skip_record(self, offset: int) -> None:
        """A record that is neither an event record nor a known control record: read past it."""
        self._advance_read(offset)

    def _advance_read(self, offset: int) -> bool:
        """Move the read position past ``offset``; False if the record was read already.

        Records before the checkpoint's position are in S3 (a batch record straddling it is
        read again and filtered per event); a record delivered twice is read once. A jump
        forward is counted: on a plain topic offsets are contiguous, so a gap means records
        this partition never saw.
        """
        end = position(offset + 1)
        if end <= self.next_pos:
            return False
        expected = self.read_offset
        if offset > expected and self.next_pos:
            self.offset_gaps += 1
        self.next_pos = end  # never below skip_pos: _restore starts there
        return True

    # ------------------------------------------------------------ windowing
    def _snapshot(self) -> Snapshot:
        # Shared while nothing changed: a window close emits one object per project, and 50,000
        # invented project ids must not cost 50,000 copies of the same (watermark, routes).
        snapshot = self._last_snapshot
        if snapshot.watermark != self.watermark or snapshot.routes is not self.routes:
            snapshot = self._last_snapshot = Snapshot(self.watermark, self.routes)
        return snapshot

    def _advance(self, watermark: float, at: int, flush_late: bool = False) -> None:
        if watermark > self.watermark:
            previous = self.watermark
            self.watermark = watermark
            if watermark >= self._next_close or self._passes_boundary(previous, watermark):
                self._close_windows(at)
                return
        if flush_late:
            self._flush_late(at)

    def _passes_boundary(self, previous: float, watermark: float) -> bool:
        """Windows with no data here still need manifest parts when the watermark passes them."""
        span = self.size + self.lateness
        if previous == _NEG_INF:
            return False
        return int((watermark - span) // self.size) != int((previous - span) // self.size)

    def _close_windows(self, at: int) -> None:
        edge = self.watermark - self.size - self.lateness
        closing = [k for k in self.open if k[2] <= edge]
        starts: set[int] = set()
        for k in closing:
            buf = self.open.pop(k)
            starts.add(buf.start)
            self._emit(buf, at)
        # Manifest parts: every window the watermark passed, with or without data here.
        last_edge_start = int(edge // self.size) * self.size
        if self._last_closed_start is not None:
            first = self._last_closed_start + self.size
        else:
            # The first close (e.g. an idle partition's first tick, well after its only events): the
            # windows between its first events and the edge need parts too, or their manifests
            # never complete.
            first = min(starts, default=last_edge_start)
        first = max(first, last_edge_start - (MAX_EMPTY_PARTS_PER_ADVANCE - 1) * self.size)
        starts.update(range(first, last_edge_start + 1, self.size))
        if starts:
            self._last_closed_start = max(max(starts), self._last_closed_start or max(starts))
        for start in sorted(starts):
            self._write_part(start, at)
        self._next_close = min((k[2] + self.size + self.lateness for k in self.open), default=float("inf"))
        self._flush_late(at)

    def _flush_late(self, at: int) -> None:
        if not self.late:
            return
        for buf in self.late.values():
            self._emit(buf, at)
        self.late = {}

    def _emit(self, buf: Buffer, at: int) -> None:
        if not buf.events:
            return
        bucket, prefix = buf.target
        key = object_key(prefix, buf.project_id, buf.collection, buf.start, buf.kind, self.partition, buf.first_pos)
        obj = PendingObject(
            id=next(self._ids),
            bucket=bucket,
            key=key,
            # Small bodies as exact-size bytes: a bytearray's header and spare capacity are most
            # of a one-event object's bytes, and 50,000 of them can wait for their upload.
            body_lines=bytes(buf.data) if buf.nbytes <= SMALL_BODY_BYTES else buf.data,
            body_json=None,
            events=buf.events,
            nbytes=buf.nbytes,
            project_id=buf.project_id,
            collection=buf.collection,
            start=buf.start,
            kind=buf.kind,
            first_pos=buf.first_pos,
            last_pos=buf.last_pos,
            snapshot=buf.snapshot,
            flush_at=at,
        )
        if buf.kind == KIND_ON_TIME:
            self.windows.setdefault(buf.start, WindowManifest()).objects[obj.id] = obj.describe()
        self.flushes.setdefault((buf.project_id, buf.collection, buf.start), FlushesAfterCommit()).add(at)
        self.inflight[obj.id] = obj
        self.outbox.append(obj)

    def _write_part(self, start: int, at: int) -> None:
        meta = self.windows.setdefault(start, WindowManifest())
        if meta.part_emitted:
            return  # written (or pending) already, also across a restart
        meta.part_emitted = True
        meta.part_at = at
        bucket, prefix = self.manifest_target
        objects = sorted(meta.objects.values(), key=lambda o: o["key"])
        body = orjson.dumps(
            {
                "window_start": start,
                "topic": self.topic,
                "partition": self.partition,
                "objects": objects,
                "events": sum(o["events"] for o in objects),
                "bytes": sum(o["bytes"] for o in objects),
            },
            option=orjson.OPT_SORT_KEYS,
        )
        obj = PendingObject(
            id=next(self._ids),
            bucket=bucket,
            key=manifest_part_key(prefix, start, self.topic, self.partition),
            body_lines=None,
            body_json=body,
            events=0,
            nbytes=len(body),
            project_id="",
            collection="",
            start=start,
            kind=KIND_MANIFEST_PART,
            first_pos=at,
            last_pos=at,
            snapshot=self._snapshot(),
            flush_at=at,
        )
        self.inflight[obj.id] = obj
        self.outbox.append(obj)

    # ---------------------------------------------------------- durability
    def done(self, item_id: int) -> None:
        """An upload or overflow produce is durable."""
        item = self.inflight.pop(item_id, None)
        if not isinstance(item, PendingObject):
            return
        if item.kind == KIND_MANIFEST_PART:
            meta = self.windows.get(item.start)
            if meta is not None:
                meta.part_durable = True
                meta.objects.clear()
            return
        if item.kind == KIND_ON_TIME and item.start in self.windows:
            self.windows[item.start].durable.add(item.id)
        wkey = (item.project_id, item.collection, item.start)
        flushes = self.flushes.get(wkey)
        if flushes is None:
            return
        if flushes.durable(item.flush_at):
            self.skip.setdefault(item.start, {})[(item.project_id, item.collection)] = flushes.durable_through

    def commit_point(self) -> tuple[int, dict[str, Any]]:
        """(offset to commit, checkpoint to store with it): all before is durable."""
        hold_pos, snapshot = self.next_pos, self._snapshot()
        for item in itertools.chain(self.open.values(), self.late.values()):
            if item.first_pos < hold_pos:
                hold_pos, snapshot = item.first_pos, item.snapshot
        for pending in self.inflight.values():
            if pending.first_pos < hold_pos:
                hold_pos, snapshot = pending.first_pos, pending.snapshot
        hold_pos = max(hold_pos, self.skip_pos)
        skip = []
        for wkey, flushes in list(self.flushes.items()):
            if not flushes.pending and flushes.durable_through <= hold_pos:
                del self.flushes[wkey]  # wholly before the commit point: nothing to remember
                by_pc = self.skip.get(wkey[2])
                if by_pc is not None:
                    by_pc.pop(wkey[:2], None)
                    if not by_pc:
                        del self.skip[wkey[2]]
                continue
            if flushes.durable_through > hold_pos:
                skip.append([*wkey, flushes.durable_through])
        windows: dict[str, Any] = {}
        parts_written: list[list[int]] = []  # [window start, part position] of durable parts
        for start, meta in list(self.windows.items()):
            if meta.part_durable:
                if meta.part_at > hold_pos:
                    # The replay closes this window again: without this it would overwrite the
                    # durable part with one that lacks the objects it skips as already in S3.
                    parts_written.append([start, meta.part_at])
                else:
                    del self.windows[start]
                continue
            # Only objects already durable: the others are written again by the replay.
            windows[str(start)] = [o for oid, o in meta.objects.items() if oid in meta.durable]
        checkpoint = {
            "position": hold_pos,
            "watermark": snapshot.watermark if snapshot.watermark != _NEG_INF else None,
            "routes": {p: [r.mode, r.fraction] for p, r in snapshot.routes.items()},
            "skip": skip,
            "windows": windows,
        }
        if parts_written:
            checkpoint["parts_written"] = parts_written
        return position_offset(hold_pos), checkpoint

    def _restore(self, checkpoint: Mapping[str, Any]) -> None:
        self.skip_pos = int(checkpoint.get("position", 0))
        self.next_pos = self.skip_pos
        wm = checkpoint.get("watermark")
        self.watermark = float(wm) if wm is not None else _NEG_INF
        self.routes = {p: Route(m, float(f)) for p, (m, f) in checkpoint.get("routes", {}).items()}
        for project, collection, start, durable_through in checkpoint.get("skip", []):
            self.flushes[(project, collection, start)] = FlushesAfterCommit(durable_through=durable_through)
            self.skip.setdefault(start, {})[(project, collection)] = durable_through
        edge = self.watermark - self.size - self.lateness
        if self.watermark != _NEG_INF:
            self._last_closed_start = int(edge // self.size) * self.size
        for start_text, objects in checkpoint.get("windows", {}).items():
            start = int(start_text)
            meta = self.windows[start] = WindowManifest()
            for n, descriptor in enumerate(objects):
                meta.objects[-n - 1] = descriptor
                meta.durable.add(-n - 1)
            if start <= edge:
                # Closed before the commit point but its part was not durable: write it again.
                self._write_part(start, self.skip_pos)
        for start, part_at in checkpoint.get("parts_written", []):
            self.windows[int(start)] = WindowManifest(part_emitted=True, part_durable=True, part_at=int(part_at))

    # ------------------------------------------------------------- views
    def backlog(self) -> dict[str, Any]:
        oldest = min((b.start for b in itertools.chain(self.open.values(), self.late.values())), default=None)
        return {
            "open_windows": len(self.open),
            "late_buffers": len(self.late),
            "inflight": len(self.inflight),
            "offset_gaps": self.offset_gaps,
            "future_corrected": self.future_corrected,
            "records_failed": self.records_failed,
            "buffered_bytes": sum(b.nbytes for b in self.open.values()) + sum(b.nbytes for b in self.late.values()),
            "watermark": self.watermark if self.watermark != _NEG_INF else None,
            "oldest_open_window": oldest,
        }
