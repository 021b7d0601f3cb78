"""One event of a record as the line it is exported as: the real-time path's rules, outside its loop.

``PartitionWindows.process`` applies these rules inline (its loop is the sink's hot path, which
``benchmarks/bench_sink.py`` measures); the overflow drain applies them here to the records the
sink diverted whole (``DivertedBatch``), so a diverted event reaches S3 exactly as it would have
on time. ``tests/overflow/test_raw_diversion_unit.py`` holds the two to the same output.
"""

from __future__ import annotations

from typing import Any

import orjson

from streamapp.contract import END_EVENT_SECONDS, MIN_EVENT_SECONDS, RecordStamps, enrich_event
from streamapp.enrichment import AddonError, run_addons

__all__ = ["EventRefused", "export_line"]


class EventRefused(Exception):
    """An event the real-time path would have dead-lettered: ``reason`` says why, ``line`` is the
    event's bytes for the dead letter (None: it cannot be encoded; keep the whole record's)."""

    def __init__(self, reason: str, line: bytes | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.line = line


def export_line(
    event: Any, index: int, stamps: RecordStamps, max_future_seconds: float, max_event_bytes: int
) -> tuple[float, bytes]:
    """(event time it is windowed at, its JSON line); raises ``EventRefused``.

    ``event`` is enriched in place (``keen`` timestamps, id, add-ons), as on the real-time path.
    """
    if type(event) is not dict:
        raise EventRefused(f"event {index} is not an object", _encoded(event))
    event_time = enrich_event(event, index, stamps)
    if event_time > stamps.seconds + max_future_seconds:
        # A client clock far ahead: window it at the record's time, keep the client's value.
        event["keen"]["window_timestamp"] = stamps.created_at
        event_time = stamps.seconds
    if not MIN_EVENT_SECONDS <= event_time < END_EVENT_SECONDS:
        raise EventRefused(f"event {index} time {event_time} is outside 1970-9999", _encoded(event))
    if "addons" in event["keen"]:
        try:
            run_addons(event)
        except AddonError as exc:
            raise EventRefused(f"event {index}: {exc.reason}", _encoded(event)) from None
    try:
        line = orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError as exc:  # orjson's decoder accepts nesting its encoder refuses (over 255)
        raise EventRefused(f"event {index} cannot be encoded: {exc}", None) from None
    if len(line) > max_event_bytes:
        raise EventRefused(f"event {index} of {len(line)} bytes is over {max_event_bytes}", line)
    return event_time, line


def _encoded(event: Any) -> bytes | None:
    try:
        return orjson.dumps(event)
    except TypeError:
        return None
