"""The meter service of one worker: per-project rates, quotas, shed decisions and shed markers.

The meter agent (``streamapp.agents.meter``) feeds it batches of events-topic records;
a 1 s timer calls :meth:`Meter.tick` so that quiet projects can leave shed after the
cooldown and health-aware limits follow the sink. Everything here is synchronous except
sending what was decided (shed markers into the events topic, shed states to the control
topic) and the read model's pass for the views (read-only, in slices: ``read_model``), so a
decision and its table write can never interleave with another one.

``Meter`` holds the state and owns the lifecycle (rebuild from the recovered tables on
every rebalance, revoke) and the driving (a batch, the tick); its parts are one module each:

* ``counting``: the hot path (``observe``) and the rate rows (replay guard: see there);
* ``decisions``: quotas, modes, the shed state machine, episodes, health-aware limits;
* ``publishing``: the outbox of decisions, written by ``run_flusher`` / ``run_publisher``;
* ``read_model``: what the views and /metrics call: :meth:`top`, :meth:`series`,
  :meth:`shed`, :meth:`counters`, :meth:`status`;
* ``eviction``: forgetting idle projects.

Collaborators are passed in (the Faust app for the assignment, the producer and produce
latency; the settings; the control plane; the S3 sink for its routing counters and backlog;
the tables), all when it is built (``streamapp.wiring``). The overflow drain's status is the
drain's own (``OverflowDrain.status``): the views and /metrics read it there.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import faust
import orjson

from streamapp.contract import is_valid_name
from streamapp.control import control_secrets
from streamapp.partitioning import key_partition
from streamapp.tables.meter import (
    MeterTables,
    PartitionContext,
    RatesRow,
    StateRow,
    decode_rates,
    decode_state,
    read_rows,
)

from .counting import MeterCounting
from .decisions import SHAPING_HORIZON_SECONDS, MeterDecisions
from .eviction import EVICT_INTERVAL_SECONDS, MeterEviction
from .project_meter import ProjectMeter
from .publishing import MeterPublishing, Outbox
from .read_model import READ_MODEL_WANTED_SECONDS, MeterReadModel
from .second_counts import SecondCounts, merge_counts
from .shed import Quota, ShedState
from .unknown import shared_meter_id

if TYPE_CHECKING:
    from streamapp.control import ControlPlane
    from streamapp.settings import Settings
    from streamapp.sink import S3Sink

log = logging.getLogger("streamapp.meter")  # the name before the split: log filters keep working
R = TypeVar("R", RatesRow, StateRow)


class Meter(MeterCounting, MeterDecisions, MeterPublishing, MeterReadModel, MeterEviction):
    """The meter of one worker: the state every part works on, its lifecycle, and the driving.

    Its parts, one concern per module: counting (``observe``, ``write_rates``), decisions
    (``decide``, ``update_health``), publishing (``flush``, ``run_flusher``, ``run_publisher``),
    the read model (``top``, ``series``, ``shed``, ``counters*``, ``status``) and eviction
    (``evict_idle``).
    """

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        control: ControlPlane,
        sink: S3Sink,
        tables: MeterTables,
    ) -> None:
        self.app = app
        self.settings = settings
        self.control = control  # control view (quotas, overrides), caught_up, publish()
        self.sink = sink  # per-partition routing counters, backlog() for health
        self.tables = tables
        self.topic = settings.events_topic
        self.context = PartitionContext(app, self.topic)
        self.burst_h = settings.burst_horizon_seconds
        self.sustained_h = settings.sustained_horizon_seconds
        self.ring_size = max(self.burst_h, self.sustained_h)
        self.shaping_h = min(SHAPING_HORIZON_SECONDS, self.ring_size)
        self.projects: dict[str, ProjectMeter] = {}
        self.by_key: dict[bytes, ProjectMeter] = {}
        self.floors: dict[int, int] = {}  # partition -> highest offset counted before the last reload
        # partition -> (newest record second counted, wall time it was counted): the metering clock
        # of a partition the consumer is behind on (MeterDecisions.record_lag).
        self.record_clock: dict[int, tuple[int, float]] = {}
        self.partitions: set[int] = set()
        self.ready = False  # tables recovered and loaded for the current assignment
        self.started_at = time.monotonic()
        self.episodes: deque[dict[str, Any]] = deque(maxlen=200)
        self.health = {"factor": 1.0, "backlog_age_seconds": 0.0, "produce_latency_ms": float("nan")}
        self.tightened: dict[str, float] = {}  # project -> health factor applied to its quota
        self.markers_written = 0
        # Signs shed markers: the first of the cluster's secrets (control_records.control_secrets).
        self._control_secret = (control_secrets(settings.control_secret) or (b"",))[0]
        self.batches = 0
        self.events_in = 0
        self.replayed = 0  # records skipped as counted before the last reload
        self.not_ready = 0  # records seen while not ready (counted by the next owner)
        self.foreign = 0  # records whose value does not name their key's project: counted for nobody
        self._out = Outbox()
        self._publish_queue: asyncio.Queue[dict[str, Any]] | None = None
        self._dirty: dict[bytes, ProjectMeter] = {}  # rate rows counted into, not written yet
        self._rows_due = 0.0
        self._flush_wanted = asyncio.Event()  # decisions wait in _out for run_flusher
        self.unknown_policy = settings.unknown_projects
        # A project idle this long is forgotten (evict_idle): never before its ring is all zeros.
        self.idle_seconds = max(float(self.ring_size), settings.idle_project_seconds)
        self.default_quota = Quota(settings.default_eps_limit, settings.default_bps_limit, settings.burst_tolerance)
        self.shared: dict[int, ProjectMeter] = {}  # partition -> meter of its unknown projects
        # Worker-lifetime totals over every project (exact whatever was evicted): /metrics' "other".
        self.received_total = 0
        self.bytes_total = 0
        self.evicted_outcomes: dict[str, int] = {"admitted": 0, "diverted": 0, "dropped": 0, "shadow_excess": 0}
        self.evicted = 0  # idle projects forgotten so far
        # What the 1 s tick decides on (not every project: 100,000 of them would take the event
        # loop for ~0.1 s a second): the watched ones (shed, a marker or a manual state in force)
        # and those counted while decisions had to wait (control plane not caught up).
        self._watched: dict[str, ProjectMeter] = {}
        self._undecided: dict[str, ProjectMeter] = {}
        self._top_cache: tuple[float, int, list[str]] | None = None
        # The /metrics snapshot of the last refresh: totals and the selected projects' counters,
        # taken together so that "other" = totals - labelled is exact.
        self._totals_snapshot: tuple[dict[str, int], dict[str, dict[str, int]]] | None = None
        self._read_model_wanted_at = -math.inf  # the tick refreshes it only while views are read
        self._evict_due = 0.0
        self._evict_more = False  # the last pass stopped at EVICT_BATCH: go on at the next tick

    # ------------------------------------------------------------ lifecycle
    def active_partitions(self) -> set[int]:
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == self.topic}

    def revoke(self) -> None:
        """Partitions are being reassigned: write what is counted (they are still ours), then stop
        counting and deciding until the tables are recovered."""
        if self.ready:
            self.write_rates()
        self.ready = False

    def reload(self) -> None:
        """Rebuild the in-memory state from the (recovered) tables of the partitions now owned."""
        self.partitions = self.active_partitions()
        self._dirty = {}
        self.projects.clear()
        self.by_key.clear()
        self.shared = {}
        self._watched, self._undecided, self._top_cache, self._totals_snapshot = {}, {}, None, None
        self.floors = {}
        self.record_clock = {}
        idle_before = int(time.time() - self.idle_seconds)
        skipped = 0
        for key, row in self._owned_rows(self.tables.rates, decode_rates, "rates"):
            self.floors[row.partition] = max(self.floors.get(row.partition, -1), row.offset)
            if (row.counts.last_second or 0) < idle_before:
                skipped += 1  # idle: loaded again (as new) when it sends, like an evicted project
                continue
            pm = self._new(key, row.partition)
            if pm is None:
                continue
            counts = row.counts
            if counts.size != self.ring_size:  # the horizons were changed since the row was written
                counts = merge_counts(counts, size=self.ring_size)
            pm.counts, pm.offset, pm.received, pm.nbytes = counts, row.offset, row.received, row.nbytes
        for key, srow in self._owned_rows(self.tables.states, decode_state, "shed-state"):
            pm = self.by_key.get(key)
            if pm is None and not (srow.state.is_shed or srow.marker is not None or srow.state.manual is not None):
                continue  # an idle project's "ok" row: nothing to enforce
            pm = pm or self._new(key, srow.partition)
            if pm is None:
                continue
            pm.state, pm.marker, pm.peak_eps = srow.state, srow.marker, srow.peak_eps
            self._watch(pm)
            if pm.marker is not None:
                pm.fraction = pm.marker[1]
                # State the route in force again (the same route again changes nothing in the
                # sink): cheap insurance that the log and the recovered row agree.
                self._out.markers.append((pm, pm.marker))
            if pm.state.is_shed and not any(
                e["project_id"] == pm.project_id and e["episode"] == pm.state.episode for e in self.episodes
            ):
                self.episodes.append(self._episode(pm, recovered=True))
        shed = [p for p, pm in self.projects.items() if pm.state.is_shed]
        log.info(
            "meter: partitions %s loaded, %d projects (%d idle rows not loaded), shed: %s, counted through offsets %s",
            sorted(self.partitions),
            len(self.projects),
            skipped,
            shed,
            self.floors,
        )
        self.ready = True
        self._wake_flusher()

    def _owned_rows(self, table: Any, decode: Callable[[bytes], R], what: str) -> Iterator[tuple[bytes, R]]:
        """The decodable rows of ``table`` on the partitions now owned; bad rows are logged and skipped."""
        for key, value in read_rows(table):
            try:
                row = decode(value)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                log.warning("ignoring bad %s row %r: %r", what, key, exc)
                continue
            if row.partition in self.partitions:
                yield key, row

    def _new(self, key: bytes, partition: int) -> ProjectMeter | None:
        try:
            project_id = key.decode()
        except UnicodeDecodeError:
            return None
        shared = project_id == shared_meter_id(partition)
        if not shared and not is_valid_name(project_id):
            return None
        pm = ProjectMeter(
            project_id,
            key,
            partition,
            SecondCounts(self.ring_size),
            ShedState(project_id, mode=self.mode_for(project_id)),
        )
        self.projects[project_id] = pm
        self.by_key[key] = pm
        if shared:
            self.shared[partition] = pm
        return pm

    def _watch(self, pm: ProjectMeter) -> None:
        """Keep ``_watched`` in step with what makes a project need the tick without new data."""
        if pm.state.is_shed or pm.marker is not None or pm.state.manual is not None:
            self._watched[pm.project_id] = pm
        else:
            self._watched.pop(pm.project_id, None)

    def _meter_for(self, key: bytes, partition: int) -> ProjectMeter | None:
        """The meter of a project not metered now (new, or forgotten while idle).

        Unless the policy is ``export``, a project not created in the control plane is metered
        as its partition's shared pseudo-project: a bug that invents ids costs one meter per
        partition, and its events are shed together under one quota.
        """
        if self.unknown_policy != "export":
            try:
                project_id = key.decode()
            except UnicodeDecodeError:
                return None
            if project_id not in self.control.view.projects:
                if not is_valid_name(project_id):
                    return None
                return self.shared.get(partition) or self._new(shared_meter_id(partition).encode(), partition)
        return self._new(key, partition)

    # ------------------------------------------------------------- driving
    async def handle_batch(self, records: list[Any]) -> None:
        """One fetched batch from the agent; errors are logged, never raised into the agent."""
        try:
            await self.handle(records)
        except Exception:  # the meter must never stop the consumer the sink depends on
            log.exception("meter: batch of %d records failed", len(records))

    async def handle(self, records: list[Any]) -> None:
        """One fetched batch of raw records from the meter agent."""
        touched = self.observe(records)
        if touched:
            if self.can_decide():
                self.decide(touched, time.time())
            else:
                self._undecided.update((pm.project_id, pm) for pm in touched)
        self._wake_flusher()

    async def tick(self) -> None:
        """Every second: health, overrides of projects not seen yet, and every live project."""
        if self.ready:
            self.write_rates()
        if self.can_decide():
            self._tick(time.time())
        if self.ready and (self._evict_more or time.monotonic() >= self._evict_due):
            self._evict_due = time.monotonic() + EVICT_INTERVAL_SECONDS
            self.evict_idle(time.time())
        if self.ready and time.monotonic() - self._read_model_wanted_at < READ_MODEL_WANTED_SECONDS:
            await self.refresh_read_model(time.time())
        self._wake_flusher()

    def _tick(self, now: float) -> None:
        self.update_health(now)
        view = self.control.view
        for project_id, override in list(view.overrides.items()):
            if project_id not in self.projects and override.get("action") == "shed":
                partition = key_partition(project_id, self.settings.topic_partitions)
                if partition in self.partitions:
                    self._new(project_id.encode(), partition)
        # A project's rates only fall while no data arrives, so one that is not shed needs the state
        # machine again only for data not decided on yet (``handle`` decides what it counts).
        live = dict(self._watched)
        live.update(self._undecided)
        self._undecided = {}
        projects = self.projects
        for project_id in itertools.chain(view.overrides, self.tightened):
            pm = projects.get(project_id)
            if pm is not None:
                live[project_id] = pm
        self.decide(list(live.values()), now)
