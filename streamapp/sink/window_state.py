"""The state a partition's windows keep between records (``PartitionWindows``, streamapp.sink.partition).

Routes and snapshots (what a shed marker set, and the state to restore from), the open buffers
of a window, the per-project route counters, and the bookkeeping of which flushes and manifest
parts are durable. Plain data with slots: a window close of 50,000 invented project ids holds
50,000 of some of these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamapp.sink.layout import Target

__all__ = ["Buffer", "FlushesAfterCommit", "Route", "RouteCounts", "Snapshot", "WindowManifest"]


@dataclass(frozen=True, slots=True)
class Route:
    """How a shed project's events are routed; set by shed markers in the log."""

    mode: str  # "divert" | "drop" | "shadow"
    fraction: float  # share admitted to the real-time path


@dataclass(frozen=True, slots=True)
class Snapshot:
    watermark: float
    routes: Mapping[str, Route]


@dataclass(slots=True)
class Buffer:
    project_id: str
    collection: str
    start: int
    kind: str
    target: Target
    first_pos: int
    snapshot: Snapshot
    # The JSON lines, appended into one buffer: orjson's output bytes each hold a ~4 KB
    # allocation whatever their length, so keeping them as objects took ~16x the data.
    data: bytearray = field(default_factory=bytearray)
    events: int = 0
    last_pos: int = 0

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(slots=True)
class RouteCounts:
    admitted: int = 0
    diverted: int = 0
    dropped: int = 0
    shadow_excess: int = 0


@dataclass(slots=True)
class FlushesAfterCommit:
    """Flushes of one (project, collection, window) after the commit point."""

    # Flat pairs: flush position, objects of that flush not durable yet. Flat (not a list per
    # flush) because a window close of 50,000 one-object projects holds 50,000 of these.
    pending: list[int] = field(default_factory=list)
    durable_through: int = 0  # its events before this position are all in S3

    def add(self, at: int) -> None:
        """One more object of the flush at read position ``at``."""
        pending = self.pending
        if pending and pending[-2] == at:
            pending[-1] += 1
        else:
            pending += (at, 1)

    def durable(self, at: int) -> bool:
        """One object of the flush at ``at`` is durable; True if ``durable_through`` advanced."""
        pending = self.pending
        for i in range(0, len(pending), 2):
            if pending[i] == at:
                pending[i + 1] -= 1
                break
        advanced = False
        while pending and pending[1] == 0:
            self.durable_through = max(self.durable_through, pending[0])
            del pending[:2]
            advanced = True
        return advanced


@dataclass(slots=True)
class WindowManifest:
    """One window start: its on-time objects, for the manifest part."""

    part_emitted: bool = False
    part_durable: bool = False
    part_at: int = 0  # read position at which the part was written (a replay from before it writes it again)
    objects: dict[int, dict[str, Any]] = field(default_factory=dict)  # object id -> descriptor
    durable: set[int] = field(default_factory=set)
