"""The events of one diverted record as the real-time path would write them: a pure function of
the overflow record's bytes (no I/O, no clock reads, no state), so the drain can run it in its own
loop or in its process pool (``streamapp.overflow.pool``) and get the same lines either way.

``OverflowChunks`` decides everything that depends on the log (duplicates, the project's export
target, chunk cuts); this module only parses, enriches and encodes. Its output is grouped by window
start, in the record's event order within each window, so adding a record's groups to a chunk gives
the same bytes as adding its events one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streamapp.contract import InvalidRecord, check_identity, parse_record, record_stamps
from streamapp.sink.diversions import read_overflow_record
from streamapp.sink.event_lines import EventRefused, export_line
from streamapp.sink.layout import window_start


@dataclass(frozen=True, slots=True)
class ExportLimits:
    """The real-time path's limits (``Settings``), applied to the events of diverted records."""

    window_seconds: int
    max_record_bytes: int = 1_000_000
    max_event_bytes: int = 900_000
    max_future_seconds: float = 3600.0


@dataclass(slots=True)
class RecordLines:
    """What one diverted record exports: ``refused`` says why the whole record is dead-lettered;
    otherwise its names, its events' JSON lines by window and the dead letters of single events."""

    source: int  # where the sink read the record (events topic partition and offset)
    source_offset: int
    refused: str | None = None
    project: str = ""
    collection: str = ""
    events: int = 0  # events in the record, exported or not
    windows: list[tuple[int, bytes, int]] = field(default_factory=list)  # (start, JSON lines, events)
    dead: list[tuple[bytes, str]] = field(default_factory=list)  # (the event's bytes or the record's, why)


def export_diverted(key: bytes | None, value: bytes, limits: ExportLimits) -> RecordLines:
    """The lines of the diverted record ``value`` (``sink.diversions.overflow_record``); raises
    ``ValueError`` when it is not one."""
    return export_record(key, *read_overflow_record(value), limits)


def export_record(
    key: bytes | None, source: int, source_offset: int, timestamp_ms: int, raw: bytes, limits: ExportLimits
) -> RecordLines:
    """The lines of the events-topic record ``raw``, read by the sink at ``source_offset`` of its
    partition ``source`` with Kafka timestamp ``timestamp_ms``, keyed ``key``."""
    try:
        record = parse_record(raw, limits.max_record_bytes)
        check_identity(key, record.project_id)
    except InvalidRecord as exc:  # the sink checked both (contract.scan_batch): events orjson refuses
        return RecordLines(source, source_offset, refused=exc.reason)
    stamps = record_stamps(source, source_offset, timestamp_ms)
    windows: dict[int, list] = {}  # start -> [lines, events]
    dead: list[tuple[bytes, str]] = []
    for index, event in enumerate(record.events):
        try:
            event_time, line = export_line(event, index, stamps, limits.max_future_seconds, limits.max_event_bytes)
        except EventRefused as exc:
            dead.append((exc.line if exc.line is not None else raw, exc.reason))
            continue
        except Exception as exc:  # noqa: BLE001 - an event can only ever cost itself
            dead.append((raw, f"event {index} failed ({type(exc).__name__}: {str(exc)[:200]})"))
            continue
        start = window_start(event_time, limits.window_seconds)
        window = windows.get(start)
        if window is None:
            window = windows[start] = [bytearray(), 0]
        window[0] += line
        window[1] += 1
    return RecordLines(
        source,
        source_offset,
        project=record.project_id,
        collection=record.collection,
        events=len(record.events),
        windows=[(start, bytes(lines), n) for start, (lines, n) in windows.items()],
        dead=dead,
    )


def export_many(records: list[tuple[bytes | None, bytes]], limits: ExportLimits) -> list[RecordLines | None]:
    """``export_diverted`` of each (key, value); None where it raised (the drain then reads that
    record in its own loop, where the same exception has the same outcome). One call per slice of
    a fetched batch: what the process pool runs."""
    out: list[RecordLines | None] = []
    for key, value in records:
        try:
            out.append(export_diverted(key, value, limits))
        except Exception:  # noqa: BLE001 - decided again, record by record, by the drain's own loop
            out.append(None)
    return out
