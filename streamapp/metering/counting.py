"""The meter's hot path: counting fetched events-topic records into per-project rings, and
writing the rate rows (at most once per project per second, never per event).

The project id is the record *key*, counted only when the value names the same project
(``contract.value_names_project``: a few byte scans for the usual one-event record; the sink
dead-letters the others, so a record keyed ``victim`` carrying ``mallory``'s events is counted
against nobody); batch records (value containing ``"events"``) are scanned only to count their
events (``contract.scan_batch``: no event objects built); bytes are ``len(value)``. Counts are
aggregated per (project, record-timestamp second) over the batch, then added to the project's
ring once per second-bucket.

Replay guard: the events topic is committed by the S3 sink only when the events are in S3, so
after a restart or rebalance the meter re-reads records it already counted (the recovered rate
rows hold them). Each rate row keeps the last offset it counted; records at or below it are
skipped, so a restart does not double the rates (and shed steady projects).

``MeterCounting`` is one part of ``streamapp.metering.service.Meter``, which holds the state.
"""

from __future__ import annotations

import heapq
import time
from typing import TYPE_CHECKING, Any

import orjson

from streamapp.contract import scan_batch, value_names_project
from streamapp.tables.meter import RatesRow, encode_rates, write_rows

from .project_meter import ProjectMeter

if TYPE_CHECKING:
    from streamapp.control import ControlPlane
    from streamapp.tables.meter import MeterTables, PartitionContext

# A project's rate row is written at most this often (see Meter.write_rates).
ROWS_INTERVAL_SECONDS = 1.0
# Rate rows written per interval at most (heaviest first): a row not written yet only means its
# records are counted again after a crash, as for rows lost in the last second before one.
MAX_ROWS_PER_WRITE = 100
TRIVIAL_ROW_EVENTS = 10  # see Meter._drop_trivial_rows


def batch_event_count(value: bytes) -> int:
    """Events in a record whose value mentions ``"events"``: the batch's length, else 1."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return 1
    if type(doc) is dict:
        events = doc.get("events")
        if type(events) is list:
            return len(events)
    return 1


def events_for_key(value: bytes, key: bytes) -> int:
    """Events a batch record counts for the project ``key``: -1 when its value names another project.

    Its ``project_id`` is read with its event count (one-event records:
    ``contract.value_names_project``, inline in ``Meter.observe``): by ``contract.scan_batch``
    without building the events, or, for anything it is unsure of, by decoding the document.
    """
    envelope = scan_batch(value)
    if envelope is not None:
        return envelope.events if envelope.project_id.encode() == key else -1
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return -1
    if type(doc) is not dict:
        return -1
    project_id = doc.get("project_id")
    if type(project_id) is not str or project_id.encode() != key:
        return -1
    events = doc.get("events")
    return len(events) if type(events) is list else 1


class MeterCounting:
    """Counting and rate-row writing of the ``Meter`` (its state: see ``Meter.__init__``)."""

    ready: bool
    partitions: set[int]
    floors: dict[int, int]
    record_clock: dict[int, tuple[int, float]]
    by_key: dict[bytes, ProjectMeter]
    shared: dict[int, ProjectMeter]
    tables: MeterTables
    context: PartitionContext
    control: ControlPlane
    batches: int
    events_in: int
    replayed: int
    not_ready: int
    foreign: int
    received_total: int
    bytes_total: int
    _dirty: dict[bytes, ProjectMeter]
    _rows_due: float
    _watched: dict[str, ProjectMeter]

    def observe(self, records: list[Any]) -> list[ProjectMeter]:
        """Count raw events-topic records (one fetched batch); rows are written at most once a second."""
        if not self.ready:
            # Rebalancing: these partitions may have a new owner already, which re-reads them
            # from the committed offset; rows must not be written for partitions not owned.
            self.not_ready += len(records)
            return []
        owned = self.partitions
        acc: dict[tuple[bytes, int], list[int]] = {}
        acc_get = acc.get
        floors = self.floors
        floors_get = floors.get
        by_key = self.by_key
        n_events = 0
        for m in records:
            key = m.key
            if not key or key[0] == 0:  # control record (tick, shed marker) or no project
                continue
            offset = m.offset
            partition = m.partition
            if floors and offset <= floors_get(partition, -1):
                pm = by_key.get(key) or self.shared.get(partition)
                if pm is not None and offset <= pm.offset:
                    self.replayed += 1
                    continue  # counted before the restart/rebalance
            value = m.value
            if not value:
                self.foreign += 1
                continue  # invalid: the sink dead-letters it
            if b'"events"' in value:
                n = events_for_key(value, key)
            else:
                n = 1 if value_names_project(value, key) else -1
            if n < 0:
                self.foreign += 1  # names another project (or none): invalid, counted against nobody
                continue
            nbytes = len(value)
            k = (key, m.timestamp // 1000)  # raw records: timestamps in milliseconds
            a = acc_get(k)
            if a is None:
                acc[k] = [n, nbytes, partition, offset]
            else:
                a[0] += n
                a[1] += nbytes
                a[3] = offset
            n_events += n
        self.batches += 1
        self.events_in += n_events
        if not acc:
            return []
        now = time.time()
        now_sec = int(now)
        touched: dict[bytes, ProjectMeter] = {}
        newest: dict[int, int] = {}  # partition -> newest record second of this batch (not ahead of ours)
        for (key, sec), (n, nbytes, partition, offset) in sorted(acc.items(), key=lambda kv: kv[0][1]):
            if partition not in owned:
                continue
            pm = touched.get(key) or by_key.get(key)
            if pm is None:
                pm = self._meter_for(key, partition)
                if pm is None:
                    continue
            touched[pm.key] = pm
            # A client clock ahead of ours must not push the ring into the future (it would then
            # drop every on-time count as "too old").
            sec = min(sec, now_sec)
            pm.counts.add(sec, n, nbytes)
            if sec > newest.get(partition, -1):
                newest[partition] = sec
            pm.received += n
            pm.nbytes += nbytes
            self.received_total += n
            self.bytes_total += nbytes
            if offset > pm.offset:
                pm.offset = offset
            pm.partition = partition
        clock = self.record_clock
        for partition, sec in newest.items():
            previous = clock.get(partition)
            clock[partition] = (max(sec, previous[0]) if previous is not None else sec, now)
        self._dirty.update(touched)
        if time.monotonic() >= self._rows_due:
            self.write_rates()
        return list(touched.values())

    def write_rates(self) -> None:
        """Write the rate rows counted into since the last write: one per project, at most once a
        ``ROWS_INTERVAL_SECONDS``. Faust stalls the consumer while more than 100 table writes wait
        for its producer, so fewer, coalesced writes keep the shared consumer flowing. A row holds
        the offset it counted up to: after a crash the records past it are simply counted again."""
        self._rows_due = time.monotonic() + ROWS_INTERVAL_SECONDS
        if not self._dirty:
            return
        if len(self._dirty) > MAX_ROWS_PER_WRITE:
            self._drop_trivial_rows()
        if len(self._dirty) <= MAX_ROWS_PER_WRITE:
            dirty, self._dirty = self._dirty, {}
        else:
            # Thousands of projects at once (a bug inventing ids): the heaviest first, the rest
            # next second. Each row is a changelog record through Faust's producer buffer, which
            # stalls the consumer (the sink of every project) while it is full.
            heaviest = heapq.nlargest(MAX_ROWS_PER_WRITE, self._dirty.values(), key=lambda pm: pm.counts.events_held)
            dirty = {pm.key: pm for pm in heaviest}
            for key in dirty:
                del self._dirty[key]
        rows = [
            (pm.partition, pm.key, encode_rates(RatesRow(pm.partition, pm.offset, pm.received, pm.nbytes, pm.counts)))
            for pm in dirty.values()
            if pm.partition in self.partitions
        ]
        write_rows(self.tables.rates, self.context, rows)

    def _drop_trivial_rows(self) -> None:
        """Thousands of rows waiting: forget those of unknown projects with a handful of events.

        Such a row only guards against counting its few events twice after a crash: harmless
        next to any quota (a created project's rows are always written, whatever its quota).
        """
        known, watched = self.control.view.projects, self._watched
        trivial = [
            key
            for key, pm in self._dirty.items()
            if pm.counts.events_held < TRIVIAL_ROW_EVENTS
            and pm.project_id not in known
            and pm.project_id not in watched
        ]
        for key in trivial:
            del self._dirty[key]
