"""Pure metering logic: per-second counts and rates, shed state machine, pacing, health.

No Kafka, Faust, I/O or clock reads here: time is always passed in as float seconds.
"""

from __future__ import annotations

from .bucket import Pacer, TokenBucket
from .health import HEALTH_FLOOR, health_factor, sink_backlog_age, tighten_heaviest
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
    "step",
    "tally",
    "tighten_heaviest",
    "with_mode",
]
