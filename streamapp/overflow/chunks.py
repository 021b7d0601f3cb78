"""Chunks of one overflow partition, as a deterministic state machine (no I/O).

The S3 sink diverts a shed project's excess records to the overflow topic whole, as read
(``streamapp.sink.diversions.overflow_record``: a head naming the source partition, offset and
timestamp, then the record's value; keyed by project id, in the partition number of the source).
Here their events get what the real-time path would have given them (``sink.event_lines``:
enrichment, checks, add-ons); an event it would have dead-lettered is dead-lettered from here
(``dead_letters``, with the source partition and offset). Records of earlier versions
(``{"project_id", "collection", "source_partition", "positions", "events"}``, events already
enriched) are still read. The drain agent feeds records here in log order and delivers what comes
out: *chunks*, each a set of "delayed" S3 objects plus the offset to commit once they (and the
chunk's checkpoint) are in S3.

Exactly once, like the real-time sink:

* Chunk boundaries are a function of the log only: a chunk is cut when it reaches
  ``max_events`` or ``max_bytes`` (checked after a whole record), or at a tick record
  (``contract.TICK_KEY``) that the drain writes into an idle overflow partition. So a
  replay from a committed offset (always a cut) cuts the same chunks and writes the same
  keys with the same bytes (keys name the chunk's first contributing offset).
* The sink can write the same excess twice (it re-diverts after its own crash, with the
  same source positions), and its overflow records can land slightly out of source order
  (each diversion is its own produce). ``SeenOffsets`` remembers, per source partition,
  which source offsets were delivered among the last ``SEEN_WINDOW`` offsets (a bitmap
  below the highest one): a record of an offset already delivered is a duplicate; one of
  an offset not delivered yet is delivered even if higher offsets came first; one more
  than ``SEEN_WINDOW`` below the highest is taken as a duplicate (out-of-order delivery is
  local; re-sends after a sink crash can reach back minutes). The bitmaps are part of the
  checkpoint stored with each committed offset, so the decisions replay identically.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from streamapp.contract import (
    CONTROL_KEY_PREFIX,
    INDEX_BITS,
    TICK_KEY,
    event_time_in_range,
    is_valid_name,
    parse_iso_seconds,
    position,
)
from streamapp.overflow.export import ExportLimits, RecordLines, export_record
from streamapp.sink import (
    DIVERTED_HEAD,
    KIND_DELAYED,
    InvalidItem,
    Target,
    describe_object,
    gzip_lines,
    object_key,
    read_overflow_record,
    window_start,
)

SEEN_WINDOW = 1 << 16  # source offsets remembered below the highest delivered one (8 KiB of bitmap)


class SeenOffsets:
    """Source offsets of one source partition already delivered (a record's events share one)."""

    __slots__ = ("bits", "top")

    def __init__(self, top: int = -1, bits: int = 0) -> None:
        self.top = top  # highest source offset delivered, -1 before any
        self.bits = bits  # bit i set: offset top - i delivered (i < SEEN_WINDOW)

    def has(self, offset: int) -> bool:
        if offset > self.top:
            return False
        distance = self.top - offset
        if distance >= SEEN_WINDOW:
            return True  # far below everything remembered: a re-send
        return bool((self.bits >> distance) & 1)

    def add(self, offset: int) -> None:
        if offset > self.top:
            shift = offset - self.top if self.top >= 0 else SEEN_WINDOW
            self.bits = ((self.bits << shift) | 1) & ((1 << SEEN_WINDOW) - 1) if shift < SEEN_WINDOW else 1
            self.top = offset
        else:
            self.bits |= 1 << (self.top - offset)

    def to_json(self) -> list[Any]:
        raw = self.bits.to_bytes((self.bits.bit_length() + 7) // 8, "big")
        return [self.top, base64.b64encode(raw).decode()]

    @classmethod
    def from_json(cls, data: list[Any]) -> SeenOffsets:
        return cls(int(data[0]), int.from_bytes(base64.b64decode(data[1]), "big"))


@dataclass(slots=True)
class DelayedObject:
    bucket: str
    key: str
    data: bytearray  # JSON lines
    events: int
    nbytes: int
    project_id: str
    collection: str
    start: int
    kind: str = KIND_DELAYED

    def body(self) -> bytes:
        return gzip_lines(self.data)

    def describe(self) -> dict[str, Any]:
        return describe_object(self, window_start=self.start)


@dataclass(slots=True)
class Chunk:
    """Objects to write, then the checkpoint, then commit ``commit_offset``."""

    partition: int
    first_offset: int
    commit_offset: int  # next overflow offset to read once this chunk is durable
    checkpoint: dict[str, Any]
    objects: list[DelayedObject]
    events: int  # events written by this chunk
    nbytes: int


@dataclass(slots=True)
class _Group:
    data: bytearray = field(default_factory=bytearray)  # one buffer, not a bytes object per line
    events: int = 0


class OverflowChunks:
    def __init__(
        self,
        topic: str,
        partition: int,
        *,
        window_seconds: int,
        max_events: int,
        max_bytes: int,
        target: Callable[[str], Target | None],
        checkpoint: Mapping[str, Any] | None = None,
        max_record_bytes: int = 1_000_000,
        max_event_bytes: int = 900_000,
        max_future_seconds: float = 3600.0,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.size = window_seconds
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.target = target
        # The real-time path's limits (Settings), applied to the events of diverted records.
        self.limits = ExportLimits(window_seconds, max_record_bytes, max_event_bytes, max_future_seconds)
        self.next_offset = 0
        self.seen: dict[int, SeenOffsets] = {}  # source partition -> offsets delivered
        self.first_offset: int | None = None  # first offset that added events to the open chunk
        self.groups: dict[tuple[str, str, int], _Group] = {}
        self.group_targets: dict[tuple[str, str, int], Target] = {}
        self.chunk_events = 0
        self.chunk_bytes = 0
        self.ready: list[Chunk] = []
        # Events (or records) of diverted records to dead-letter, with their source partition;
        # taken by the drain after each batch.
        self.dead_letters: list[tuple[int, InvalidItem]] = []
        # Stats (not checkpointed).
        self.duplicates = 0
        self.untargeted = 0
        self.invalid = 0
        self.forged = 0  # records without a worker's signature: never delivered
        if checkpoint:
            self.next_offset = int(checkpoint.get("offset", 0))
            self.seen = {int(k): SeenOffsets.from_json(v) for k, v in (checkpoint.get("seen") or {}).items()}

    @property
    def pending_events(self) -> int:
        return self.chunk_events

    def reject(self, offset: int) -> None:
        """A record not signed by a worker (forged into the overflow topic): read past it, count it."""
        if offset < self.next_offset:
            return
        self.next_offset = offset + 1
        self.forged += 1

    def process(self, offset: int, key: bytes | None, value: bytes | None, lines: RecordLines | None = None) -> None:
        """One overflow record, in log order (its signature already checked by the drain); ``lines``:
        its events' lines if the drain's process pool exported it (else they are exported here)."""
        if offset < self.next_offset:
            return  # before the restore point: already delivered
        self.next_offset = offset + 1
        if key is not None and key[:1] == CONTROL_KEY_PREFIX:
            if key == TICK_KEY:
                self._cut(offset + 1, force=True)
            return
        if value is not None and value.startswith(DIVERTED_HEAD):
            added = self._diverted_record(key, value, lines)
        else:
            added = self._enriched_events(value)
        if added:
            if self.first_offset is None:
                self.first_offset = offset
            self.chunk_events += added
        if self.chunk_events >= self.max_events or self.chunk_bytes >= self.max_bytes:
            self._cut(offset + 1)

    def _seen(self, source: int) -> SeenOffsets:
        seen = self.seen.get(source)
        if seen is None:
            seen = self.seen[source] = SeenOffsets()
        return seen

    def _add(self, project: str, collection: str, start: int, target: Target, lines: bytes, events: int = 1) -> None:
        gkey = (project, collection, start)
        group = self.groups.get(gkey)
        if group is None:
            group = self.groups[gkey] = _Group()
            self.group_targets[gkey] = target
        group.data += lines
        group.events += events
        self.chunk_bytes += len(lines)

    def _diverted_record(self, key: bytes | None, value: bytes, lines: RecordLines | None) -> int:
        """A record the sink diverted whole: its events as the real-time path would write them
        (``lines``: ``export.export_diverted`` of it, computed by the drain's process pool)."""
        try:
            source, source_offset, timestamp_ms, raw = read_overflow_record(value)
        except ValueError:
            self.invalid += 1  # signed, yet not a diversion this version can read: nothing to deliver
            return 0
        seen = self._seen(source)
        if seen.has(source_offset):
            self.duplicates += 1  # diverted again after the sink's restart: delivered already
            return 0
        seen.add(source_offset)
        if lines is None or (lines.source, lines.source_offset) != (source, source_offset):
            lines = export_record(key, source, source_offset, timestamp_ms, raw, self.limits)
        if lines.refused is not None:
            self.dead_letters.append((source, InvalidItem(source_offset, key, raw, lines.refused)))
            return 0
        project, collection = lines.project, lines.collection
        target = self.target(project)
        if target is None:
            self.untargeted += lines.events  # the project does not export (any more)
            return 0
        for line, reason in lines.dead:
            self.dead_letters.append((source, InvalidItem(source_offset, key, line, reason)))
        added = 0
        for start, data, events in lines.windows:
            self._add(project, collection, start, target, data, events)
            added += events
        return added

    def _enriched_events(self, value: bytes | None) -> int:
        """A diversion of an earlier version: its events already enriched, with their positions."""
        try:
            doc = orjson.loads(value or b"")
            project = doc["project_id"]
            collection = doc["collection"]
            source = int(doc["source_partition"])
            positions = doc["positions"]
            events = doc["events"]
            if not (isinstance(positions, list) and isinstance(events, list) and len(positions) == len(events)):
                raise ValueError("positions and events differ")
            # Anyone may produce to the overflow topic: check every field before it is used.
            if not (is_valid_name(project) and is_valid_name(collection)):
                raise ValueError("bad project or collection")
            if type(doc["source_partition"]) is not int or not 0 <= source < 1 << 31:
                raise ValueError("bad source partition")
            if not all(type(pos) is int and pos >= 0 for pos in positions):
                raise ValueError("positions must be non-negative integers")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError):
            self.invalid += 1  # not written by the sink: nothing to deliver
            return 0
        seen = self._seen(source)
        # Decide per source offset before marking any: a record's events share their offset.
        fresh = {pos >> INDEX_BITS for pos in positions if not seen.has(pos >> INDEX_BITS)}
        for source_offset in fresh:
            seen.add(source_offset)
        target = self.target(project)
        dumps = orjson.dumps
        newline = orjson.OPT_APPEND_NEWLINE
        added = 0
        for pos, event in zip(positions, events, strict=True):
            if (pos >> INDEX_BITS) not in fresh:
                self.duplicates += 1
                continue
            if target is None or type(event) is not dict:
                self.untargeted += 1  # the project does not export (any more): the excess goes nowhere
                continue
            keen = event.get("keen")
            event_time = None
            if isinstance(keen, dict):
                # Where the sink windowed it: keen.window_timestamp when it corrected a future time.
                event_time = parse_iso_seconds(keen.get("window_timestamp") or keen.get("timestamp"))
            if event_time is None or not event_time_in_range(event_time):
                event_time = 0.0
            self._add(project, collection, window_start(event_time, self.size), target, dumps(event, option=newline))
            added += 1
        return added

    def _cut(self, commit_offset: int, force: bool = False) -> None:
        if not self.chunk_events and not force:
            return
        first = self.first_offset if self.first_offset is not None else commit_offset - 1
        objects = []
        for (project, collection, start), group in sorted(self.groups.items()):
            bucket, prefix = self.group_targets[(project, collection, start)]
            key = object_key(prefix, project, collection, start, KIND_DELAYED, self.partition, position(first))
            objects.append(
                DelayedObject(bucket, key, group.data, group.events, len(group.data), project, collection, start)
            )
        self.ready.append(
            Chunk(
                partition=self.partition,
                first_offset=first,
                commit_offset=commit_offset,
                checkpoint=self.checkpoint(commit_offset),
                objects=objects,
                events=self.chunk_events,
                nbytes=self.chunk_bytes,
            )
        )
        self.groups = {}
        self.group_targets = {}
        self.first_offset = None
        self.chunk_events = 0
        self.chunk_bytes = 0

    def checkpoint(self, offset: int) -> dict[str, Any]:
        return {"offset": offset, "seen": {str(k): v.to_json() for k, v in sorted(self.seen.items())}}
