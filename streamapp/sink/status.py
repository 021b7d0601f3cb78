"""What the sink shows per partition: its status, and the backlog the views and the meter read.

``S3Sink.backlog()`` is read by the meter's health check (every tick), /sink/ and /metrics; a
partition's ``PartitionWindows.backlog()`` is a pass over its open buffers (50,000 with invented
project ids), so it is cached for ``BACKLOG_CACHE_SECONDS``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from faust.types import TP

from streamapp.sink.partition import PartitionWindows

__all__ = ["BACKLOG_CACHE_SECONDS", "BacklogReader", "PartitionStatus"]

BACKLOG_CACHE_SECONDS = 1.5  # > the meter tick (1 s), which reads it for the health check


@dataclass
class PartitionStatus:
    """What the views show per partition."""

    committed_offset: int = 0
    seen_pos: int = 0
    control_read: int = 0  # control records read (ticks, shed markers): events are the activity
    seen_control: int = 0
    last_message_at: float = field(default_factory=time.monotonic)  # last look that found events
    last_tick_at: float = 0.0
    ticked_close: float = 0.0  # the window close the last tick was sent for
    oldest_unflushed_event_at: float | None = None
    last_flush_at: float = 0.0


class BacklogReader:
    """The per-partition backlog rows of the sink, each partition's windows read at most once per
    ``BACKLOG_CACHE_SECONDS``."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._cache: dict[int, tuple[float, PartitionWindows, dict[str, Any]]] = {}
        self._unread_since: dict[int, float] = {}  # partition -> first look that found it with unread records

    def windows_backlog(self, partition: int, windows: PartitionWindows) -> dict[str, Any]:
        """``windows.backlog()`` (a pass over its open buffers: 50,000 with invented project ids)
        at most once per ``BACKLOG_CACHE_SECONDS``: the meter's health check, /sink/ and /metrics
        all read it."""
        now = time.monotonic()
        cached = self._cache.get(partition)
        if cached is not None and cached[1] is windows and now - cached[0] < BACKLOG_CACHE_SECONDS:
            return cached[2]
        info = windows.backlog()
        self._cache[partition] = (now, windows, info)
        return info

    def rows(
        self, partitions: Mapping[int, PartitionWindows], status: Mapping[int, PartitionStatus], consumer: Any
    ) -> dict[str, Any]:
        rows = {}
        now = time.time()
        for partition, windows in sorted(partitions.items()):
            partition_status = status.get(partition) or PartitionStatus()
            highwater = consumer.highwater(TP(self.topic, partition)) or 0
            info = self.windows_backlog(partition, windows)
            oldest = info.get("oldest_open_window")
            unflushed_age = max(0.0, now - oldest) if oldest is not None else 0.0
            read_lag = max(0, highwater - windows.read_offset)
            if read_lag:
                unread_since = self._unread_since.setdefault(partition, now)
            else:
                unread_since = self._unread_since.pop(partition, now)
            rows[str(partition)] = {
                **info,
                "committed_offset": partition_status.committed_offset,
                "read_offset": windows.read_offset,
                "highwater": highwater,
                "offsets_behind": max(0, highwater - partition_status.committed_offset),
                "read_lag": read_lag,
                # Since when every look found records unread (0 when caught up): a backlog lasts,
                # while the sink's own watermark tick in an idle partition is unread for a moment.
                "unread_seconds": round(now - unread_since, 3) if read_lag else 0.0,
                "oldest_unflushed_age_seconds": round(unflushed_age, 3),
                "last_flush_at": partition_status.last_flush_at,
            }
        return rows
