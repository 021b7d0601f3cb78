"""The metering domain: per-project counts and rates, quotas, the shed state machine and its
vocabulary, pacing, health, and the meter service built on them.

What this package exports (``__all__``) is what other packages use: the pure logic (no Kafka,
Faust, I/O or clock reads: time is always passed in as float seconds), the shed vocabulary
(``ShedMode``, ``SHED_MODES``...) and the per-project Prometheus series. Settings, control
records and the API tier import it, so importing it must stay cheap and must not import them
back: the parts that do I/O are imported from their own modules by the Faust wiring
(``streamapp.agents.meter``) and tests, never from here:

* ``service``: ``Meter``, the meter of one worker (state, lifecycle, driving), made of
  ``counting`` (the hot path), ``decisions``, ``publishing``, ``read_model`` and ``eviction``,
  over ``project_meter.ProjectMeter``;
* ``debug_page``: the meter's own ``/_meter/`` page.

Its tables and their row codecs are ``streamapp.tables.meter``.
"""

from __future__ import annotations

from .bucket import Pacer, TokenBucket
from .health import HEALTH_FLOOR, health_factor, sink_backlog_age, sink_is_idle, tighten_heaviest
from .project_series import DEFAULT_TOP_N, OTHER, PROJECT_OUTCOMES, BoundedProjectCounters, project_families
from .second_counts import DEFAULT_SIZE, SecondCounts, merge_counts, tally
from .shed import (
    MANUAL,
    MIN_ADMIT_FRACTION,
    MODES,
    STATES,
    Quota,
    ShedState,
    admit_event,
    admit_fraction,
    admit_many,
    admit_threshold,
    effective_quota,
    mix64,
    retry_after_seconds,
    set_manual,
    step,
    with_mode,
)
from .vocabulary import MANUAL_OVERRIDES, NOT_SHED, SHED_MODES, SHED_STATES, ManualOverride, ShedMode, ShedStatus

__all__ = [
    "project_families",
    "BoundedProjectCounters",
    "PROJECT_OUTCOMES",
    "OTHER",
    "DEFAULT_TOP_N",
    "DEFAULT_SIZE",
    "HEALTH_FLOOR",
    "MANUAL",
    "MANUAL_OVERRIDES",
    "MIN_ADMIT_FRACTION",
    "MODES",
    "NOT_SHED",
    "SHED_MODES",
    "SHED_STATES",
    "STATES",
    "ManualOverride",
    "Pacer",
    "Quota",
    "SecondCounts",
    "ShedMode",
    "ShedState",
    "ShedStatus",
    "TokenBucket",
    "admit_event",
    "admit_fraction",
    "admit_many",
    "admit_threshold",
    "effective_quota",
    "health_factor",
    "merge_counts",
    "mix64",
    "retry_after_seconds",
    "set_manual",
    "sink_backlog_age",
    "sink_is_idle",
    "step",
    "tally",
    "tighten_heaviest",
    "with_mode",
]
