"""Forgetting idle projects: 100,000 idle projects must not cost memory.

A project idle for the ring's length (its rates are all zero, so a fresh meter is the same) is
forgotten, with the sink's per-project counters of projects no longer metered (folded into the
worker totals so /metrics stays exact). ``MeterEviction`` is one part of
``streamapp.metering.service.Meter``, which holds the state.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from .project_meter import ProjectMeter

if TYPE_CHECKING:
    from streamapp.control import ControlPlane
    from streamapp.sink import S3Sink

    from .publishing import Outbox

# Idle projects are looked for this often; a project idle for the ring's length (its rates are all
# zero, so a fresh meter is the same) is forgotten: 100,000 idle projects must not cost memory.
EVICT_INTERVAL_SECONDS = 5.0
EVICT_BATCH = 10_000


class MeterEviction:
    """Idle-project eviction of the ``Meter`` (its state: see ``Meter.__init__``)."""

    control: ControlPlane
    sink: S3Sink
    idle_seconds: float
    projects: dict[str, ProjectMeter]
    by_key: dict[bytes, ProjectMeter]
    shared: dict[int, ProjectMeter]
    tightened: dict[str, float]
    evicted: int
    evicted_outcomes: dict[str, int]
    _dirty: dict[bytes, ProjectMeter]
    _out: Outbox
    _undecided: dict[str, ProjectMeter]
    _evict_more: bool

    def evict_idle(self, now: float) -> int:
        """Forget projects idle for ``idle_seconds`` (STREAMAPP_IDLE_PROJECT_SECONDS, at least the
        ring's length: their rates are zero, a new meter is the same), with the sink's per-project
        counters of projects no longer metered and their rate rows not written yet. Shed, marked
        or overridden ones stay. At most ``EVICT_BATCH`` a pass; returns how many.

        What is lost: a forgotten project's cumulative counters start again from 0 when it sends
        again (the worker totals in /metrics stay exact), and its rate row stays in RocksDB only
        (a restart does not load idle rows either).
        """
        idle_before = int(now - self.idle_seconds)
        overrides = self.control.view.overrides
        dirty, pending_rows, tightened = self._dirty, self._out.rows, self.tightened
        idle = (
            pm
            for pm in self.projects.values()
            if (pm.counts.last_second or -1) < idle_before
            and not pm.state.is_shed
            and pm.marker is None
            and pm.state.manual is None
            and pm.project_id not in overrides
            and pm.project_id not in pending_rows
            and pm.project_id not in tightened
        )
        # At most EVICT_BATCH a pass (the next pass follows a second later): forgetting 100,000
        # at once would hold the event loop for most of a second.
        gone = list(itertools.islice(idle, EVICT_BATCH))
        for pm in gone:
            del self.projects[pm.project_id]
            self.by_key.pop(pm.key, None)
            dirty.pop(pm.key, None)  # an idle row: a restart does not load it either
            self._undecided.pop(pm.project_id, None)
            if self.shared.get(pm.partition) is pm:
                del self.shared[pm.partition]
        if len(gone) > len(self.projects):  # a dict keeps its table after deletes: give it back
            self.projects, self.by_key = dict(self.projects), dict(self.by_key)
        self.evicted += len(gone)
        more = False
        # The sink's per-project counters (views only, not part of any checkpoint): keep those of
        # metered projects; the rest go into the totals so /metrics stays exact.
        projects, totals = self.projects, self.evicted_outcomes
        for windows in list(self.sink.partitions.values()):
            counts = windows.counts
            unmetered = list(itertools.islice((p for p in counts if p not in projects), EVICT_BATCH))
            for project_id in unmetered:
                c = counts.pop(project_id)
                totals["admitted"] += c.admitted
                totals["diverted"] += c.diverted
                totals["dropped"] += c.dropped
                totals["shadow_excess"] += c.shadow_excess
            if len(unmetered) > len(counts):
                windows.counts = dict(counts)
            more = more or len(unmetered) == EVICT_BATCH
        self._evict_more = more or len(gone) == EVICT_BATCH
        return len(gone)
