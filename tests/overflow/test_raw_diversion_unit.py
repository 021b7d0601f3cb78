"""Whole-record diversion (issue #12): the sink diverts a shed project's records as read, the drain
gives their events what the real-time path would have.

* Parity: the same records, exported on time by ``PartitionWindows`` or diverted and delivered by
  ``OverflowChunks``, give the same event lines (enrichment, future-stamp correction, add-ons) and
  the same dead letters (reasons, source offsets).
* The sink's cost: a diverted record is not decoded into events, enriched or encoded again.
* Hostile input: a signed overflow record whose head or body is anything at all, and records of
  any JSON, never raise from the drain; each of their events is delivered or dead-lettered.
"""

from __future__ import annotations

import gzip
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamapp.contract import TICK_KEY, InvalidRecord, check_identity, parse_record
from streamapp.overflow.chunks import OverflowChunks
from streamapp.sink.diversions import DIVERTED_HEAD, overflow_record, read_overflow_record
from streamapp.sink.partition import PartitionWindows
from streamapp.sink.window_state import Route

WINDOW = 10
T0 = 1_800_000_000
T0_MS = T0 * 1000
UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"


def iso(seconds: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_windows(route: Route | None, checkpoint: dict[str, Any] | None = None) -> PartitionWindows:
    windows = PartitionWindows(
        "events",
        2,
        window_seconds=WINDOW,
        lateness=5,
        max_object_bytes=1 << 30,
        max_event_bytes=2_000,
        max_record_bytes=100_000,
        target=lambda project: ("bucket", "pre"),
        manifest_target=("bucket", "pre"),
        checkpoint=checkpoint,
        max_future_seconds=3600,
    )
    if route is not None:
        windows.marker(0, "p", route)
    return windows


def new_chunks() -> OverflowChunks:
    return OverflowChunks(
        "events-overflow",
        2,
        window_seconds=WINDOW,
        max_events=1 << 30,
        max_bytes=1 << 30,
        target=lambda project: ("bucket", "pre"),
        max_record_bytes=100_000,
        max_event_bytes=2_000,
        max_future_seconds=3600,
    )


def lines_of(bodies: list[bytes]) -> dict[str, dict[str, Any]]:
    """keen.id -> event, over gzip JSON-lines bodies."""
    out = {}
    for body in bodies:
        for line in gzip.decompress(body).splitlines():
            event = orjson.loads(line)
            out[event["keen"]["id"]] = event
    return out


ADDON = {"name": "keen:ua_parser", "input": {"ua_string": "ua"}, "output": "parsed"}
RECORDS: list[dict[str, Any]] = [
    {"project_id": "p", "collection": "c", "event": {"n": 1}},  # stamped with the record's time
    {"project_id": "p", "collection": "c", "event": {"n": 2, "keen": {"timestamp": iso(T0 - 3 * WINDOW)}}},
    {"project_id": "p", "collection": "c", "event": {"n": 3, "keen": {"timestamp": iso(T0 + 7200)}}},  # corrected
    {"project_id": "p", "collection": "c", "event": {"n": 4, "keen": {"timestamp": "1969-12-31T23:59:59Z"}}},
    {"project_id": "p", "collection": "c", "event": {"n": 5, "ua": UA, "keen": {"addons": [ADDON]}}},
    {"project_id": "p", "collection": "c", "event": {"n": 6, "keen": {"addons": "not a list"}}},
    {"project_id": "p", "collection": "c", "event": {"n": 7, "pad": "x" * 3000}},  # over max_event_bytes
    {"project_id": "p", "collection": "d", "events": [{"n": 8}, 5, [1], {"n": 9, "keen": {"id": "mine"}}]},
]


def test_diverted_records_reach_s3_as_they_would_have_on_time() -> None:
    on_time, diverted = new_windows(None), new_windows(Route("divert", 1e-9))
    for offset, doc in enumerate(RECORDS, start=1):
        for windows in (on_time, diverted):
            windows.process(offset, T0_MS + offset, b"p", orjson.dumps(doc))
    for windows in (on_time, diverted):
        windows.tick(len(RECORDS) + 1, T0 + 10 * WINDOW)
    assert not [obj for obj in diverted.outbox if obj.body_lines is not None]  # manifest parts only
    assert diverted.counts["p"].diverted == 11
    chunks = new_chunks()
    for overflow_offset, batch in enumerate(diverted.diverted):
        assert batch.record == orjson.dumps(RECORDS[batch.offset - 1])  # as read: not re-encoded
        chunks.process(overflow_offset, b"p", overflow_record(2, batch.offset, batch.timestamp_ms, batch.record))
    chunks.process(len(diverted.diverted), TICK_KEY, b"{}")

    expected = lines_of([obj.body() for obj in on_time.outbox if obj.body_lines is not None])
    delivered = lines_of([obj.body() for chunk in chunks.ready for obj in chunk.objects])
    assert delivered == expected
    # The sink counts a diverted record's events as diverted; the drain dead-letters the invalid ones.
    assert on_time.counts["p"].admitted == len(expected)
    assert {event["n"] for event in delivered.values()} == {1, 2, 3, 5, 8, 9}
    assert delivered[expected_id(3)]["keen"]["window_timestamp"] == iso(T0 + 3 / 1000)  # corrected future stamp
    assert delivered[expected_id(5)]["parsed"]["browser"]["family"] == "Chrome"  # the add-on ran
    # Grouped by the window the sink would have used (event time), as "delayed" objects.
    starts = {obj.start for chunk in chunks.ready for obj in chunk.objects}
    assert starts == {T0 // WINDOW * WINDOW, (T0 - 3 * WINDOW) // WINDOW * WINDOW}

    sink_letters = sorted((item.offset, item.reason) for item in on_time.invalid)
    drain_letters = sorted((item.offset, item.reason) for source, item in chunks.dead_letters)
    assert drain_letters == sink_letters and len(sink_letters) == 5
    assert {source for source, _ in chunks.dead_letters} == {2}


def expected_id(n: int) -> str:
    """keen.id of the (only) event of RECORDS[n - 1], read at offset n of partition 2."""
    return f"{2:04x}{n:014x}000000"


def test_diverting_a_record_does_not_touch_its_events() -> None:
    """The sink's share of a diversion is the envelope check: no event is enriched or encoded."""
    windows = new_windows(Route("divert", 1e-9))
    value = orjson.dumps({"project_id": "p", "collection": "c", "events": [{"n": i} for i in range(500)]})
    windows.process(1, T0_MS, b"p", value)
    (batch,) = windows.diverted
    assert batch.record is value and batch.events == 500 and batch.first_pos == 1 << 20
    assert windows.counts["p"].diverted == 500 and not windows.open


def test_a_shed_project_is_sampled_by_record_and_the_admitted_records_export_in_full() -> None:
    windows = new_windows(Route("divert", 0.3))
    for offset in range(1, 1001):
        doc = {"project_id": "p", "collection": "c", "events": [{"n": offset * 10 + i} for i in range(10)]}
        windows.process(offset, T0_MS, b"p", orjson.dumps(doc))
    counts = windows.counts["p"]
    assert counts.admitted + counts.diverted == 10_000
    assert counts.admitted % 10 == 0 and 0.25 < counts.admitted / 10_000 < 0.35
    assert sum(batch.events for batch in windows.diverted) == counts.diverted


def test_a_diverted_record_before_the_checkpoint_is_not_diverted_again() -> None:
    windows = new_windows(Route("divert", 1e-9))
    value = orjson.dumps({"project_id": "p", "collection": "c", "event": {"n": 1}})
    windows.process(1, T0_MS, b"p", value)
    (batch,) = windows.diverted
    assert windows.commit_point()[0] == 1  # held by the diversion until Kafka acknowledged it
    windows.done(batch.id)
    offset, checkpoint = windows.commit_point()
    assert offset == 2
    again = new_windows(None, checkpoint)
    again.process(1, T0_MS, b"p", value)  # a redelivery from before the commit point
    again.process(2, T0_MS, b"p", value)
    assert [b.offset for b in again.diverted] == [2]


def test_an_earlier_versions_commit_point_inside_a_shed_record_exports_the_rest_on_time() -> None:
    """A version that diverted event by event could commit in the middle of a shed batch record;
    restored from such a checkpoint, that record's events past the point are not lost."""
    from streamapp.contract import position

    value = orjson.dumps({"project_id": "p", "collection": "c", "events": [{"n": i} for i in range(6)]})
    checkpoint = {"position": position(1, 4), "watermark": T0 - 100.0, "routes": {"p": ["divert", 1e-9]}}
    windows = new_windows(None, checkpoint)
    windows.process(1, T0_MS, b"p", value)
    windows.tick(2, T0 + 10 * WINDOW)
    assert not windows.diverted
    exported = lines_of([obj.body() for obj in windows.outbox if obj.body_lines is not None])
    assert sorted(event["n"] for event in exported.values()) == [4, 5]


@pytest.mark.parametrize("timestamp_ms", [-1, 0, 253402300800001, 2**63 - 1])
def test_any_kafka_timestamp_of_a_diverted_record_is_carried(timestamp_ms: int) -> None:
    chunks = new_chunks()
    record = orjson.dumps({"project_id": "p", "collection": "c", "event": {"n": 1, "keen": {"timestamp": iso(T0)}}})
    chunks.process(0, b"p", overflow_record(2, 7, timestamp_ms, record))
    chunks.process(1, TICK_KEY, b"{}")
    # Read, then exported or dead-lettered as the sink would have (-1: the event is stamped an
    # hour past its 1969 record time, so it is windowed at that time, outside 1970-9999).
    delivered = sum(chunk.events for chunk in chunks.ready)
    assert chunks.invalid == 0 and delivered + len(chunks.dead_letters) == 1
    assert delivered == (0 if timestamp_ms == -1 else 1)


def test_the_drain_delivers_each_source_offset_once() -> None:
    chunks = new_chunks()
    value = overflow_record(2, 7, T0_MS, orjson.dumps({"project_id": "p", "collection": "c", "event": {"n": 1}}))
    for overflow_offset in range(3):  # re-diverted after two sink restarts
        chunks.process(overflow_offset, b"p", value)
    chunks.process(3, TICK_KEY, b"{}")
    assert sum(chunk.events for chunk in chunks.ready) == 1 and chunks.duplicates == 2


@pytest.mark.parametrize(
    "value",
    [
        DIVERTED_HEAD + b'"source_partition":0,"offset":1,"timestamp_ms":0}',  # no newline
        DIVERTED_HEAD + b'"source_partition":"0","offset":1,"timestamp_ms":0}\n{}',
        DIVERTED_HEAD + b'"source_partition":-1,"offset":1,"timestamp_ms":0}\n{}',
        DIVERTED_HEAD + b'"source_partition":0,"offset":1e300,"timestamp_ms":0}\n{}',
        DIVERTED_HEAD + b'"source_partition":0,"offset":1,"timestamp_ms":[1]}\n{}',
        DIVERTED_HEAD + b'"source_partition":0,"offset":1,"timestamp_ms":1e400}\n{}',
        DIVERTED_HEAD + b'"source_partition":0,"offset":1,"timestamp_ms":9223372036854775808}\n{}',
        DIVERTED_HEAD + b'"source_partition":0,"offset":1}\n{}',
        DIVERTED_HEAD + b"not json\n{}",
    ],
)
def test_a_signed_record_with_a_bad_head_is_read_past(value: bytes) -> None:
    with pytest.raises(ValueError):
        read_overflow_record(value)
    chunks = new_chunks()
    chunks.process(0, b"p", value)
    chunks.process(1, TICK_KEY, b"{}")
    assert chunks.invalid == 1 and not chunks.dead_letters and not any(chunk.objects for chunk in chunks.ready)


@pytest.mark.parametrize(
    ("key", "record", "reason"),
    [
        (b"p", b"\xff not json", "not valid JSON"),
        (b"p", b"[]", "not an object"),
        (b"victim", b'{"project_id":"p","collection":"c","event":{}}', "is not the value's project_id"),
        (None, b'{"project_id":"p","collection":"c","event":{}}', "is not the value's project_id"),
        (b"p", b'{"project_id":"p","collection":"c"}', "neither 'event' nor 'events'"),
        (b"p", b'{"project_id":"p","collection":"c","event":"p","events":[]}', "both 'event' and 'events'"),
    ],
)
def test_a_diverted_record_the_contract_refuses_is_dead_lettered(key: bytes | None, record: bytes, reason: str) -> None:
    chunks = new_chunks()
    chunks.process(0, key, overflow_record(1, 9, T0_MS, record))
    ((source, item),) = chunks.dead_letters
    assert (source, item.offset, item.key, item.value) == (1, 9, key, record)
    assert reason in item.reason


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
STAMPS = st.sampled_from(
    ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00Z", "2026-13-45T99:99:99Z", iso(T0 + 7200), iso(T0 - 86400)]
)
KEEN = st.one_of(JSON, st.fixed_dictionaries({}, optional={"timestamp": st.one_of(STAMPS, JSON), "addons": JSON}))
EVENT = st.one_of(JSON, st.fixed_dictionaries({}, optional={"keen": KEEN, "x": JSON}))
ENVELOPE = st.fixed_dictionaries(
    {"project_id": st.sampled_from(["p", "victim", "_manifests", ""]), "collection": st.sampled_from(["c", "_x"])},
    optional={"event": EVENT, "events": st.one_of(st.lists(EVENT, max_size=5), JSON)},
)
HEADS = st.fixed_dictionaries(
    {
        "source_partition": st.one_of(st.integers(0, 5), JSON),
        "offset": st.one_of(st.integers(0, 2**62), JSON),
        "timestamp_ms": st.one_of(st.integers(-(2**63), 2**63 - 1), JSON),
    }
)


@settings(max_examples=300, deadline=None)
@given(
    key=st.one_of(st.none(), st.sampled_from([b"p", b"victim", b"\xff"])),
    head=HEADS,
    body=st.one_of(ENVELOPE.map(orjson.dumps), st.binary(max_size=40)),
)
def test_any_diverted_record_is_delivered_or_dead_lettered_event_by_event(
    key: bytes | None, head: dict[str, Any], body: bytes
) -> None:
    value = DIVERTED_HEAD + orjson.dumps(head)[1:] + b"\n" + body
    chunks = new_chunks()
    chunks.process(0, key, value)  # never raises
    chunks.process(1, TICK_KEY, b"{}")
    delivered = sum(chunk.events for chunk in chunks.ready)
    try:
        read_overflow_record(value)
    except ValueError:
        assert chunks.invalid == 1 and delivered == 0 and not chunks.dead_letters
        return
    try:
        record = parse_record(body, 100_000)
        check_identity(key, record.project_id)
    except InvalidRecord:
        assert delivered == 0 and len(chunks.dead_letters) == 1  # the whole record
        return
    # Every event is in S3 or dead-lettered, never both, never neither.
    assert delivered + len(chunks.dead_letters) == len(record.events)
    for chunk in chunks.ready:
        for obj in chunk.objects:
            assert obj.key.split("/")[1] == record.project_id and obj.key.endswith("-delayed.json.gz")
            for line in gzip.decompress(obj.body()).splitlines():
                assert orjson.loads(line)["keen"]["id"].startswith(f"{head['source_partition']:04x}")
