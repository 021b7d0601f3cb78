"""``ProjectMeter``: the in-memory state of one metered project, shared by every part of the meter.

The meter service (``streamapp.metering.service``) keeps one per project on the partitions this
worker owns; counting fills its ring and totals, decisions its rates, state and marker, the read
model reads them. Nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .second_counts import SecondCounts
from .shed import ShedState


@dataclass(slots=True, eq=False)
class ProjectMeter:
    """In-memory state of one project on a partition this worker owns."""

    project_id: str
    key: bytes
    partition: int
    counts: SecondCounts
    state: ShedState
    offset: int = -1  # last events-topic offset counted
    received: int = 0
    nbytes: int = 0
    marker: tuple[str, float] | None = None  # route announced by the last shed marker; None = ok
    peak_eps: float = 0.0
    eps_burst: float = 0.0
    bps_burst: float = 0.0
    eps_sustained: float = 0.0
    bps_sustained: float = 0.0
    eps_shaping: float = 0.0
    fraction: float = 1.0
    limit_eps: float = 0.0  # effective (health-tightened) quota at the last decision
    limit_bps: float = 0.0


def round_finite(x: float, digits: int = 1) -> float:
    """``round(x, digits)``, and 0.0 for NaN or infinity (rates shown in views and records)."""
    return round(x, digits) if math.isfinite(x) else 0.0
