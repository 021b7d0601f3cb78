"""Issue #9, items 1, 3, 4 and 5 without Kafka: a hostile record can only ever cost itself.

* 1: type checks before any use of a field; any JSON anywhere in an envelope is either exported
  or dead-lettered, never raised; the sink's per-record safety net; bounded dead letters.
* 3: one identity per record: key == value's project_id, in the sink and in the meter.
* 4: event time within bounds: future stamps windowed at the record's time, years outside
  1970-9999 invalid, late events of many old windows grouped into a bounded number of objects.
* 5: names starting with "_" are reserved (Kafka, HTTP API, admin, operator CLI); manifest
  composition tolerates any object under the manifests prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamapp.api import ApiError, check_collection
from streamapp.contract import (
    DEAD_LETTER_PREVIEW_BYTES,
    TICK_KEY,
    InvalidRecord,
    check_identity,
    invalid_record_value,
    is_valid_name,
    iso_from_ms,
    parse_record,
    scan_batch,
    value_names_project,
)
from streamapp.control.admin import AdminApi
from streamapp.settings import Settings
from streamapp.sink.layout import (
    KIND_LATE,
    KIND_LATE_OLDER,
    KIND_ON_TIME,
    manifest_key,
    manifest_parts_prefix,
    window_iso,
)
from streamapp.sink.manifests import parse_manifest_part
from streamapp.sink.partition import LATE_WINDOWS, PartitionWindows
from streamapp.sink.service import S3Sink
from streamapp.sink.status import PartitionStatus
from tests.helpers import earlier_overflow_record
from tests.metering.test_meter_unit import new_meter, one, rec

WINDOW = 10
LATENESS = 5
T0 = 1_800_000_000  # 2027-01-15
T0_MS = T0 * 1000

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
NAMES = st.sampled_from(["p", "victim", "mallory", "_manifests", "-ok", "a" * 65, "", "p/x"])


def new_windows(checkpoint: dict[str, Any] | None = None, max_future_seconds: float = 3600.0) -> PartitionWindows:
    return PartitionWindows(
        "events",
        0,
        window_seconds=WINDOW,
        lateness=LATENESS,
        max_object_bytes=1_000_000,
        max_event_bytes=10_000,
        max_record_bytes=100_000,
        target=lambda project: ("bucket", "pre"),
        manifest_target=("bucket", "pre"),
        checkpoint=checkpoint,
        max_future_seconds=max_future_seconds,
    )


def iso(seconds: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat().replace("+00:00", "Z")


def event_record(project: str, n: Any, stamp: str | None = None, collection: str = "c") -> bytes:
    event: dict[str, Any] = {"n": n}
    if stamp is not None:
        event["keen"] = {"timestamp": stamp}
    return orjson.dumps({"project_id": project, "collection": collection, "event": event})


def written(windows: PartitionWindows) -> dict[str, list[dict[str, Any]]]:
    """Objects in the outbox (key -> events), marked durable as if uploaded."""
    out = {}
    for obj in windows.outbox:
        if obj.body_lines is not None:
            out[obj.key] = [orjson.loads(line) for line in gzip.decompress(obj.body()).splitlines()]
        windows.done(obj.id)
    windows.outbox.clear()
    return out


# ------------------------------------------------------------------ item 1: a record costs itself


@pytest.mark.parametrize("name", [[1], {"a": 1}, 5, 1.5, None, True, ["p"]])
def test_names_are_type_checked_before_use(name: Any) -> None:
    assert is_valid_name(name) is False  # a list once raised TypeError from the set lookup
    for field in ("project_id", "collection"):
        body = {"project_id": "p", "collection": "c", "event": {}, field: name}
        with pytest.raises(InvalidRecord, match=f"bad {field}"):
            parse_record(orjson.dumps(body), 10_000)


@settings(max_examples=200, deadline=None)
@given(
    key=st.one_of(st.none(), st.binary(max_size=8), NAMES.map(str.encode)),
    envelope=st.dictionaries(
        st.sampled_from(["project_id", "collection", "event", "events", "extra"]),
        st.one_of(JSON, NAMES, st.lists(st.dictionaries(st.sampled_from(["keen", "n"]), JSON), max_size=3)),
    ),
    keen=st.one_of(
        JSON,
        st.fixed_dictionaries(
            {
                "timestamp": st.one_of(
                    JSON,
                    st.sampled_from(
                        [
                            "9999-12-31T23:59:59-05:00",
                            "0001-01-01T00:00:00Z",
                            "1969-12-31T23:59:59Z",
                            "2027-01-15T08:00:00Z",
                            "10001-01-01T00:00:00Z",
                        ]
                    ),
                )
            }
        ),
    ),
    timestamp_ms=st.sampled_from([T0_MS, 0, -1, 253402300800000, 2**62]),
)
def test_any_json_in_any_envelope_field_is_exported_or_dead_lettered_never_raised(
    key: bytes | None, envelope: dict[str, Any], keen: Any, timestamp_ms: int
) -> None:
    if isinstance(envelope.get("event"), dict):
        envelope["event"]["keen"] = keen
    value = orjson.dumps(envelope)
    windows = new_windows()
    windows.process(0, T0_MS, b"p", event_record("p", "before"))  # a finite watermark: late paths too
    windows.process(1, timestamp_ms, key, value)
    windows.tick(2, T0 + 1000)
    first_outbox = list(windows.outbox)
    exported = [e for events in written(windows).values() for e in events if e.get("n") != "before"]
    invalid = [item for item in windows.invalid if item.offset == 1]
    assert exported or invalid or _no_events(envelope), (envelope, key)
    for item in invalid:
        dead = orjson.loads(
            invalid_record_value(item.reason, topic="events", partition=0, offset=1, key=key, value=item.value)
        )
        assert dead["reason"]
    # Whatever it was, the partition moved past it: nothing pins the commit point.
    assert windows.commit_point()[0] == 3
    # And the decision is a function of the log: a replay writes the same bytes, dead-letters the same.
    replay = new_windows()
    replay.process(0, T0_MS, b"p", event_record("p", "before"))
    replay.process(1, timestamp_ms, key, value)
    replay.tick(2, T0 + 1000)
    assert [(o.key, o.body()) for o in replay.outbox] == [(o.key, o.body()) for o in first_outbox]
    assert [(i.offset, i.reason, i.value) for i in replay.invalid] == [
        (i.offset, i.reason, i.value) for i in windows.invalid
    ]


def _no_events(envelope: dict[str, Any]) -> bool:
    return envelope.get("events") == [] and "event" not in envelope


def test_the_sink_safety_net_dead_letters_a_record_that_raises_and_goes_on() -> None:
    sink, producer = new_sink()
    windows = sink.partitions[0]
    real_process = windows.process

    def process(offset: int, timestamp_ms: int, key: bytes | None, value: bytes | None) -> None:
        if offset == 1:
            raise RuntimeError("a bug the contract checks missed")
        real_process(offset, timestamp_ms, key, value)

    windows.process = process  # type: ignore[method-assign]
    records = [Raw(i, T0_MS + i, b"p", event_record("p", i)) for i in range(3)]
    records.append(Raw(3, T0_MS + 3, TICK_KEY, b"[]"))  # a control record that is not an object
    asyncio.run(sink.handle_batch(FakeTP(0), records))
    dead = [orjson.loads(v) for topic, _, v in producer.sent if topic == "events-invalid"]
    assert [d["offset"] for d in dead if "RuntimeError" in d["reason"]] == [1]
    assert windows.read_offset == 4  # read past every record, the bad ones included
    assert windows.records_failed >= 1
    # The records around it are still exported once their window closes.
    windows.tick(4, T0 + 1000)
    events = [e["n"] for objs in written(windows).values() for e in objs]
    assert sorted(events) == [0, 2]
    # A replay from before the failure dead-letters it again only if it was not committed.
    offset, checkpoint = windows.commit_point()
    assert offset == 5
    replay = new_windows(checkpoint)
    replay.reject(1, b"p", b"{}", "again")
    assert replay.invalid == []


def test_an_oversized_dead_letter_is_cut_to_a_preview_with_size_and_sha256() -> None:
    value = b"\x00" * 1_000_000  # 6 MB as JSON text: the producer refused it
    key = b"k" * 10_000
    dead_bytes = invalid_record_value("too big", topic="events", partition=2, offset=7, key=key, value=value)
    assert len(dead_bytes) < 7 * DEAD_LETTER_PREVIEW_BYTES < 1_000_000
    dead = orjson.loads(dead_bytes)
    assert dead["value_truncated"] is True
    assert dead["value_bytes"] == 1_000_000
    assert dead["value_sha256"] == hashlib.sha256(value).hexdigest()
    assert dead["value"] == "\x00" * DEAD_LETTER_PREVIEW_BYTES
    assert dead["key_bytes"] == 10_000 and len(dead["key"]) == 256
    small = orjson.loads(invalid_record_value("r \ud800", topic="events", partition=0, offset=0, key=b"p", value=b"{}"))
    assert small["value"] == "{}" and "value_truncated" not in small


# ------------------------------------------------------------------ item 3: one identity


def test_a_record_keyed_victim_carrying_mallorys_events_is_invalid_in_the_sink() -> None:
    windows = new_windows()
    windows.process(0, T0_MS, b"victim", event_record("mallory", 1))
    windows.process(1, T0_MS, None, event_record("mallory", 2))
    windows.process(2, T0_MS, b"mallory", event_record("mallory", 3))
    reasons = [item.reason for item in windows.invalid]
    assert len(reasons) == 2 and all("not the value's project_id" in r for r in reasons)
    with pytest.raises(InvalidRecord):
        check_identity(b"mallory\x00", "mallory")
    check_identity(b"mallory", "mallory")


def test_the_meter_counts_a_record_only_for_the_project_its_value_names() -> None:
    meter, _ = new_meter({0})
    now = T0
    mallory_as_victim = orjson.dumps({"project_id": "mallory", "collection": "c", "events": [{}] * 50})
    records = [rec(b"victim", one("mallory", i), i, 0, now) for i in range(30)]
    records.append(rec(b"victim", mallory_as_victim, 30, 0, now))
    records += [rec(b"victim", one("victim", i), 31 + i, 0, now) for i in range(3)]
    meter.observe(records)
    assert meter.projects["victim"].received == 3  # not 33 + 50
    assert "mallory" not in meter.projects  # counted against nobody: the sink dead-letters them
    assert meter.foreign == 31


@settings(max_examples=200, deadline=None)
@given(
    doc=st.dictionaries(st.sampled_from(["project_id", "collection", "event", "x"]), st.one_of(JSON, NAMES)), key=NAMES
)
def test_the_meters_byte_scan_agrees_with_the_sinks_parse(doc: dict[str, Any], key: str) -> None:
    truth = doc.get("project_id") == key
    for value in (orjson.dumps(doc), json.dumps(doc).encode(), json.dumps(doc, indent=1).encode()):
        assert value_names_project(value, key.encode()) is truth, value


@pytest.mark.parametrize(
    ("value", "counts_for_victim"),
    [
        (b'{"project_id":"mallory","project_id":"victim"}', True),  # duplicate: the last wins, in both
        (b'{"project_id":"mallory","project\\u005fid":"victim"}', True),  # an escaped duplicate
        (b'{"collection":"project_id","project_id":"mallory"}', False),
        (b'{"project_id":"mallory","event":{"project_id":"victim"}}', False),
        (b'{"project_id":"victimx"}', False),
        (b'{"project_id":["victim"]}', False),
        (b'["project_id","victim"]', False),
        (b'{"project_id": \n "victim", "collection": "c"}', True),
        (b'{"project_id":"mallory"', False),  # not JSON, names another project
        (b'{"collection":"c","project_id":"mallory","event":{}}', False),  # decoded: not first
        (b'{"collection":"c","project_id":"victim","event":{}}', True),
    ],
)
def test_tricky_values_are_decided_like_the_sink_decides(value: bytes, counts_for_victim: bool) -> None:
    """(A value that is not JSON but names only the key's project may count for it: it names no other.)"""
    assert value_names_project(value, b"victim") is counts_for_victim
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return
    assert (type(doc) is dict and doc.get("project_id") == "victim") is counts_for_victim


# ------------------------------------------------------------------ item 4: event time bounds


def test_a_future_timestamp_is_windowed_at_the_record_time_and_counted() -> None:
    windows = new_windows(max_future_seconds=60)
    future = iso(T0 + 7200)
    windows.process(0, T0_MS, b"p", event_record("p", "future", future))
    windows.process(1, T0_MS, b"p", event_record("p", "now", iso(T0)))
    assert windows.future_corrected == 1
    assert windows.backlog()["future_corrected"] == 1
    assert sorted(k[2] for k in windows.open) == [T0 // WINDOW * WINDOW]  # both at the record's time
    assert windows.watermark == T0  # the client's clock moved nothing
    windows.tick(2, T0 + 100)
    events = {e["n"]: e for objs in written(windows).values() for e in objs}
    assert events["future"]["keen"]["timestamp"] == future  # the client's value is kept
    assert events["future"]["keen"]["window_timestamp"] == iso_from_ms(T0_MS)
    assert "window_timestamp" not in events["now"]["keen"]


def test_an_event_stamped_ahead_within_the_bound_never_holds_the_commit_point() -> None:
    """It keeps its own window but is written at the next flush, in an "-early" object."""
    windows = new_windows(max_future_seconds=3600)
    windows.process(0, T0_MS, b"p", event_record("p", "ahead", iso(T0 + 3 * WINDOW)))
    windows.process(1, T0_MS, b"p", event_record("p", "now", iso(T0)))
    assert windows.future_corrected == 0 and windows.watermark <= T0 + 1  # a second of clock skew
    assert [k[2] for k in windows.open] == [T0 // WINDOW * WINDOW]
    # The partition's time passes the record's window: everything is written and committable.
    windows.process(2, (T0 + WINDOW + LATENESS + 1) * 1000, b"p", event_record("p", "later"))
    objects = written(windows)
    early = [k for k in objects if k.endswith("-early.json.gz")]
    assert len(early) == 1 and [e["n"] for e in objects[early[0]]] == ["ahead"]
    assert window_iso((T0 + 3 * WINDOW) // WINDOW * WINDOW) in early[0]
    assert windows.commit_point()[0] == 2  # only "later" (an open window) holds it now
    assert sum(b.events for b in windows.open.values()) == 1


@pytest.mark.parametrize(
    "stamp", ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00Z", "1969-12-31T23:59:59Z", "9999-12-31T23:59:59+00:00"]
)
def test_event_times_outside_1970_to_9999_are_dead_lettered_and_pin_nothing(stamp: str) -> None:
    windows = new_windows(max_future_seconds=1e12)  # the future bound must not hide the year check
    windows.process(0, 253402300799_000, b"p", event_record("p", "x", stamp))
    if stamp.startswith("9999-12-31T23:59:59+"):
        assert windows.invalid == [] and windows.open  # the last second of 9999 is in range
        return
    assert len(windows.invalid) == 1 and "outside 1970-9999" in windows.invalid[0].reason
    assert not windows.open
    assert windows.commit_point()[0] == 1


def test_a_record_timestamp_outside_the_years_is_invalid_too() -> None:
    windows = new_windows()
    windows.process(0, -5000, b"p", event_record("p", "x"))  # no keen.timestamp: the record's time
    windows.process(1, 253402300800_000, b"p", event_record("p", "y"))
    assert [i.offset for i in windows.invalid] == [0, 1]
    assert not windows.open and windows.commit_point()[0] == 2


def test_an_absurd_tick_is_read_past_without_moving_the_watermark() -> None:
    windows = new_windows()
    windows.process(0, T0_MS, b"p", event_record("p", 1))
    for offset, watermark in enumerate([1e300, float("inf"), -1.0], start=1):
        windows.tick(offset, watermark)
    assert windows.watermark == T0
    assert windows.read_offset == 4
    windows.process(4, T0_MS + 1000, b"p", event_record("p", 2))
    assert sum(b.events for b in windows.open.values()) == 2  # still on time, not late


def test_late_events_of_many_old_windows_make_a_bounded_number_of_objects() -> None:
    windows = new_windows()
    now = T0 + 10_000
    windows.process(0, now * 1000, b"p", event_record("p", "now", iso(now)))
    windows.tick(1, now + WINDOW + LATENESS + 1)  # closes "now": a finite watermark
    written(windows)
    # 500 late events, one per past window, for two collections.
    offset = 2
    for age in range(1, 501):
        for collection in ("a", "b"):
            stamp = iso(now - age * WINDOW)
            windows.process(offset, now * 1000, b"p", event_record("p", f"{collection}{age}", stamp, collection))
            offset += 1
    windows.tick(offset, now + 3 * WINDOW + LATENESS + 1)
    objects = written(windows)
    late = {k: v for k, v in objects.items() if "-late" in k}
    assert len(late) <= 2 * (LATE_WINDOWS + 1)
    older = [k for k in late if k.endswith("-late-older.json.gz")]
    assert len(older) == 2
    seen = Counter(e["n"] for events in late.values() for e in events)
    assert seen == Counter({f"{c}{age}": 1 for age in range(1, 501) for c in "ab"})
    kinds = {obj.kind for obj in windows.inflight.values()}
    assert KIND_LATE_OLDER not in kinds and KIND_LATE not in kinds and KIND_ON_TIME not in kinds
    # The late-older object of each collection holds all the old windows' events, keen.timestamp intact.
    for key in older:
        assert len(late[key]) > 400
        assert {e["keen"]["timestamp"] for e in late[key]} <= {iso(now - a * WINDOW) for a in range(1, 501)}
    assert windows.commit_point()[0] == offset + 1


def test_grouped_late_objects_are_the_same_on_replay() -> None:
    """Which late events share an object is a function of the log: a replay writes the same keys and bytes."""

    def run(windows: PartitionWindows, start: int, log: list[tuple[int, int, bytes, bytes]]) -> dict[str, bytes]:
        out = {}
        for offset, ts, key, value in log[start:]:
            if key == TICK_KEY:
                windows.tick(offset, orjson.loads(value)["watermark"])
            else:
                windows.process(offset, ts, key, value)
        for obj in windows.outbox:
            out[obj.key] = obj.body()
        return out

    now = T0 + 10_000
    log: list[tuple[int, int, bytes, bytes]] = [(0, now * 1000, b"p", event_record("p", "now", iso(now)))]
    log.append((1, 0, TICK_KEY, orjson.dumps({"watermark": now + WINDOW + LATENESS + 1})))
    for age in range(1, 40):
        log.append((len(log), now * 1000, b"p", event_record("p", age, iso(now - age * WINDOW))))
    log.append((len(log), 0, TICK_KEY, orjson.dumps({"watermark": now + 3 * WINDOW + LATENESS + 1})))
    first = new_windows()
    first_out = run(first, 0, log[:2])
    for obj in list(first.outbox):
        first.done(obj.id)
    first.outbox.clear()
    offset, checkpoint = first.commit_point()
    once = run(first, 2, log)
    replayed = run(new_windows(checkpoint), offset, log)
    assert first_out and once == replayed and any(k.endswith("-late-older.json.gz") for k in once)


# ------------------------------------------------------------------ item 5: reserved names


@pytest.mark.parametrize("name", ["_manifests", "_checkpoints", "_x"])
def test_names_starting_with_underscore_are_reserved_everywhere(name: str) -> None:
    assert not is_valid_name(name)
    for field in ("project_id", "collection"):
        body = {"project_id": "p", "collection": "c", "event": {}, field: name}
        with pytest.raises(InvalidRecord, match="reserved"):
            parse_record(orjson.dumps(body), 10_000)
    with pytest.raises(ApiError) as api_error:
        check_collection(name)
    assert api_error.value.status == 400 and "reserved" in api_error.value.message
    with pytest.raises(ApiError) as admin_error:
        AdminApi.project_id(name)
    assert admin_error.value.status == 400
    from streamapp.cli.quota import project_id_arg as _qt_project_id

    with pytest.raises(argparse.ArgumentTypeError, match="reserved"):
        _qt_project_id(name)
    assert is_valid_name("p_x") and is_valid_name("-p")  # only a leading "_" is reserved


def test_manifest_composition_ignores_foreign_objects_and_keeps_going() -> None:
    sink, _ = new_sink(partitions=2)
    start = T0 // WINDOW * WINDOW
    parts = manifest_parts_prefix("pre", start)
    good = {"objects": [{"key": "pre/p/x.json.gz", "events": 3, "bytes": 30}]}
    s3: FakeS3 = sink.s3  # type: ignore[assignment]
    s3.objects[f"{parts}events-0.json"] = orjson.dumps(good)
    s3.objects[f"{parts}junk.json"] = b"\xff not json"  # e.g. project "_manifests", collection "parts"
    s3.objects[f"{parts}events-1.json"] = b"[1, 2]"  # a part overwritten with garbage
    sink.manifests.pending.add(start)
    asyncio.run(sink.manifests.compose())
    manifest = orjson.loads(s3.objects[manifest_key("pre", start)])
    assert manifest["events"] == 3 and manifest["partitions"] == 1
    for body in (b"", b"null", b'{"objects": 5}', b'{"objects": [{"key": 1}]}', b'{"objects": [5]}'):
        assert parse_manifest_part("k", body) is None
    assert parse_manifest_part("k", orjson.dumps(good)) == good


# ------------------------------------------------------------------ a sink without Kafka or S3


@dataclass
class Raw:
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class FakeTP:
    partition: int
    topic: str = "events"


class FakeS3:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    async def list_keys(self, bucket: str, prefix: str) -> list[str]:
        return [k for k in self.objects if k.startswith(prefix)]

    async def get(self, bucket: str, key: str) -> bytes | None:
        return self.objects.get(key)

    async def put(self, bucket: str, key: str, body: Any, content_type: str) -> int:
        data = body()
        self.objects[key] = data
        return len(data)


class Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []

    async def send(self, topic: str, key: bytes | None, value: bytes, *args: Any) -> Any:
        self.sent.append((topic, key, value))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


def new_sink(partitions: int = 4) -> tuple[S3Sink, Producer]:
    producer = Producer()
    settings = Settings(events_topic="events", s3_bucket="bucket", s3_prefix="pre", topic_partitions=partitions)
    sink = S3Sink(  # just what these tests use: no Kafka consumer, parking, lane, control plane or metrics
        app=type("App", (), {"producer": producer, "consumer_generation_id": 1})(),  # type: ignore[arg-type]
        settings=settings,
        s3=FakeS3(),  # type: ignore[arg-type]
        checkpoints=None,  # type: ignore[arg-type]
        parking=None,  # type: ignore[arg-type]
        overflow=None,  # type: ignore[arg-type]
        control=None,  # type: ignore[arg-type]
        export_target=lambda project: ("bucket", "pre"),
        invalid_topic="events-invalid",
        overflow_topic="events-overflow",
        objects_topic="o",
        metrics=None,  # type: ignore[arg-type]
        spawn=lambda coro: asyncio.ensure_future(coro),
    )
    sink.partitions[0] = new_windows()
    sink.status[0] = PartitionStatus()
    return sink, producer


def test_future_corrections_are_counted_in_metrics() -> None:
    from streamapp.metrics import Metrics
    from tests.metering.test_metrics_unit import _runtime, _scrape

    runtime = _runtime(3)
    runtime.sink.backlog = lambda: {"0": {"future_corrected": 4}, "1": {"future_corrected": 0}}
    metrics = Metrics(top_n=5)
    metrics.bind(runtime)  # type: ignore[arg-type]
    family = _scrape(metrics)["streamapp_sink_future_corrected"]
    assert {s.labels["partition"]: s.value for s in family.samples if s.name.endswith("_total")} == {"0": 4, "1": 0}


def test_the_drain_reads_past_overflow_records_it_cannot_use() -> None:
    """Anyone can produce to the overflow topic: no field is used before it is checked (records
    in an earlier version's format; this version's: tests/overflow/test_raw_diversion_unit.py)."""
    from streamapp.overflow import OverflowChunks

    chunks = OverflowChunks(
        "overflow", 0, window_seconds=WINDOW, max_events=50, max_bytes=1 << 20, target=lambda p: ("bucket", "pre")
    )
    bad = [
        {"project_id": [1], "collection": "c", "source_partition": 0, "positions": [0], "events": [{}]},
        {"project_id": "_manifests", "collection": "c", "source_partition": 0, "positions": [0], "events": [{}]},
        {"project_id": "p", "collection": "c", "source_partition": 0, "positions": ["a"], "events": [{}]},
        {"project_id": "p", "collection": "c", "source_partition": -1, "positions": [0], "events": [{}]},
        {"project_id": "p", "collection": "c", "source_partition": 1e300, "positions": [0], "events": [{}]},
        {"project_id": "p", "collection": "c", "source_partition": 0, "positions": [0], "events": [5]},
    ]
    for offset, doc in enumerate(bad):
        chunks.process(offset, b"p", orjson.dumps(doc))
    far = {"keen": {"timestamp": "9999-12-31T23:59:59-05:00"}, "n": "far"}
    ahead = {"keen": {"timestamp": iso(T0 + 7200), "window_timestamp": iso(T0)}, "n": "ahead"}
    good = earlier_overflow_record("p", "c", 0, [1 << 20, 2 << 20], [orjson.dumps(far), orjson.dumps(ahead)])
    chunks.process(len(bad), b"p", good)
    chunks.process(len(bad) + 1, TICK_KEY, b"{}")
    assert chunks.invalid == 5  # the event that is not an object is skipped inside a good record
    keys = sorted(obj.key for chunk in chunks.ready for obj in chunk.objects)
    # Out-of-range times fall back to 1970; a corrected one goes where the sink windowed it.
    assert [k.split("/")[2] for k in keys] == ["1970-01-01T00:00:00.000Z", window_iso(T0 // WINDOW * WINDOW)]


def test_events_stamped_ahead_over_many_windows_make_a_bounded_number_of_objects() -> None:
    windows = new_windows(max_future_seconds=3600)
    for offset, ahead in enumerate(range(WINDOW, 3000, WINDOW)):  # ~300 future windows
        windows.process(offset, T0_MS, b"p", event_record("p", ahead, iso(T0 + ahead)))
    windows.tick(offset + 1, T0 + WINDOW + LATENESS + 1)
    objects = written(windows)
    early = {k: v for k, v in objects.items() if "-early" in k}
    assert len(early) <= LATE_WINDOWS + 1
    later = [k for k in early if k.endswith("-early-later.json.gz")]
    assert len(later) == 1 and window_iso(T0 // WINDOW * WINDOW + LATE_WINDOWS * WINDOW) in later[0]
    assert sorted(e["n"] for v in early.values() for e in v) == list(range(WINDOW, 3000, WINDOW))
    assert all(e["keen"]["timestamp"] == iso(T0 + e["n"]) for v in early.values() for e in v)
    assert windows.commit_point()[0] == offset + 2


def test_the_http_api_answers_400_for_a_reserved_project_id_even_if_the_control_view_holds_it() -> None:
    from types import SimpleNamespace

    from streamapp.api import IngestApi
    from streamapp.control import ProjectSettings, hash_key

    ready = asyncio.Event()
    ready.set()
    projects = {"_manifests": ProjectSettings(project_id="_manifests", key_hash=hash_key("k"))}
    control = SimpleNamespace(caught_up=ready, view=SimpleNamespace(projects=projects))
    api = object.__new__(IngestApi)  # only the checks: no producer, no metrics
    api.control = control  # type: ignore[assignment]
    request = SimpleNamespace(headers={"Authorization": "k"}, query={})
    with pytest.raises(ApiError) as error:
        api.project(request, "_manifests")  # type: ignore[arg-type]
    assert error.value.status == 400 and "reserved" in error.value.message
    assert orjson.loads(error.value.body())["error_code"] == "InvalidProjectIdError"


@pytest.mark.parametrize("stamp", ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00Z", "1969-12-31T23:59:59Z"])
def test_the_http_api_rejects_an_event_time_outside_1970_to_9999(stamp: str) -> None:
    from streamapp.api import Clock, EventRejected, enrich

    with pytest.raises(EventRejected, match="outside the years 1970-9999"):
        enrich({"keen": {"timestamp": stamp}}, Clock.at(T0))
    assert enrich({"keen": {"timestamp": "9999-12-31T23:59:59Z"}}, Clock.at(T0))["keen"]["timestamp"].startswith("9999")


def test_a_quiet_partitions_first_close_writes_parts_for_every_window_since_its_first_event() -> None:
    """An idle partition's first tick can come windows after its only event (a worker under load):
    the windows in between need this partition's manifest part, or their manifests never complete."""
    from streamapp.sink.layout import KIND_MANIFEST_PART

    windows = new_windows()
    windows.process(0, T0_MS, b"p", event_record("p", 1, iso(T0)))
    windows.tick(1, T0 + 4 * WINDOW + LATENESS)
    parts = sorted(obj.start for obj in windows.outbox if obj.kind == KIND_MANIFEST_PART)
    w0 = T0 // WINDOW * WINDOW
    assert parts == [w0 + i * WINDOW for i in range(4)]


# ------------------------------------------------------------------ scan_batch: the envelope without the events

ENVELOPE_KEYS = st.sampled_from(["project_id", "collection", "events", "event", "x"])
EVENTS = st.lists(st.one_of(st.dictionaries(st.text(max_size=4), JSON, max_size=2), JSON), max_size=4)


def _raw_object(pairs: list[tuple[str, Any]], escape: bool) -> bytes:
    """A JSON object written member by member: duplicate keys and escaped keys stay as written."""
    members = []
    for name, value in pairs:
        key = json.dumps(name).encode()
        if escape:
            key = key.replace(b"_", b"\\u005f")
        members.append(key + b":" + orjson.dumps(value))
    return b"{" + b",".join(members) + b"}"


def _as_parse_record_reads(value: bytes) -> tuple[str, str, int] | None:
    try:
        record = parse_record(value, 10_000_000)
    except InvalidRecord:
        return None
    return record.project_id, record.collection, len(record.events)


def _or_any(value: Any) -> st.SearchStrategy[Any]:
    return st.one_of(NAMES, JSON, EVENTS) if value is None else st.just(value)


#: A batch envelope (its three members in any order, values sometimes of the wrong type) with up
#: to two more members: duplicates of any of them, "event", or another name.
ENVELOPES = st.tuples(
    st.permutations(
        [
            ("project_id", "p"),
            ("collection", "c"),
            ("events", [{"n": 1}, {"n": 2}]),
        ]
    ).flatmap(
        lambda base: st.tuples(
            *[st.tuples(st.just(k), st.sampled_from([v, v, v, None]).flatmap(_or_any)) for k, v in base]
        )
    ),
    st.lists(st.tuples(ENVELOPE_KEYS, st.one_of(NAMES, JSON, EVENTS)), max_size=2),
    st.integers(0, 3),
).map(lambda t: [*t[0][: t[2]], *t[1], *t[0][t[2] :]])


@settings(max_examples=400, deadline=None)
@given(pairs=ENVELOPES, escape=st.booleans(), cut=st.integers(0, 400), junk=st.binary(max_size=3))
def test_scan_batch_reads_nothing_parse_record_would_read_differently(
    pairs: list[tuple[str, Any]], escape: bool, cut: int, junk: bytes
) -> None:
    """What the meter counts and the sink diverts without decoding is what the decode would say.

    Whenever ``scan_batch`` answers, ``parse_record`` reads the same project, collection and
    number of events, or orjson refuses the document (the drain then dead-letters it). Values:
    objects with duplicate, escaped and missing members of any type, and the same bytes cut
    short or with junk spliced in.
    """
    whole = _raw_object(pairs, escape)
    for value in (whole, whole[:cut] + junk + whole[cut:], whole[:cut]):
        envelope = scan_batch(value)
        if envelope is None:
            continue
        try:
            orjson.loads(value)
        except orjson.JSONDecodeError:
            continue
        assert _as_parse_record_reads(value) == tuple(envelope), value


@settings(max_examples=200, deadline=None)
@given(project=st.sampled_from(["p", "victim", "a-b_9"]), events=EVENTS, spaced=st.booleans())
def test_scan_batch_answers_for_every_well_formed_batch(project: str, events: list[Any], spaced: bool) -> None:
    """The fast path is taken for what producers write (compact or Python-spaced JSON)."""
    doc = {"project_id": project, "collection": "c", "events": events}
    value = json.dumps(doc).encode() if spaced else orjson.dumps(doc)
    assert scan_batch(value) == (project, "c", len(events))


@pytest.mark.parametrize(
    "value",
    [
        b'{"project_id":"mallory","collection":"c","events":[{}],"project_id":"victim"}',  # duplicate
        b'{"project_id":"mallory","collection":"c","events":[{}],"project\\u005fid":"victim"}',  # escaped one
        b'{"project_id":"p","collection":"c","events":[{}],"events":[{},{},{}]}',  # the last list wins in orjson
        b'\xef\xbb\xbf{"project_id":"p","collection":"c","events":[{}]}',  # orjson refuses a BOM
        b'{"project_id":"p","collection":"c","events":[{"n":123456789012345678901234567890}]}',  # simdjson refuses
        b'{"project_id":"p","collection":"c","events":{"0":{}}}',
        b'{"project_id":"p","collection":"_c","events":[{}]}',
        b'{"project_id":"p","events":[{}]}',
        b'{"project_id":"p","collection":"c","event":{}}',  # one event: parse_record's path
        b'{"project_id":"p","collection":"c","events":[{}],"event":{}}',  # both: parse_record refuses it
        b'["project_id","p"]',
        b"",
    ],
)
def test_scan_batch_leaves_anything_it_could_misread_to_parse_record(value: bytes) -> None:
    assert scan_batch(value) is None


def test_a_shed_record_is_diverted_unparsed_exactly_as_a_parsed_one_would_be() -> None:
    """The sink's fast divert: the same records diverted with the same counts; invalid, foreign and
    admitted records still take parse_record's path (dead-lettered or exported as before)."""
    from streamapp.sink.partition import Route

    def batch(project: str, n: int, **extra: Any) -> bytes:
        events = [{"n": i, "keen": {"timestamp": iso(T0)}} for i in range(n)]
        return orjson.dumps({"project_id": project, "collection": "c", "events": events, **extra})

    log = [(b"p", batch("p", 1 + i % 7)) for i in range(300)]
    log += [(b"p", batch("mallory", 3)), (b"p", b'{"project_id":"p","collection":"c","events":[{}'), (b"\xff", b"{}")]
    log += [(b"p", batch("p", 2, x=[1])), (b"p", orjson.dumps({"project_id": "p", "collection": "c", "event": {}}))]
    outcomes = []
    for fast in (True, False):
        windows = new_windows()
        windows.marker(0, "p", Route("divert", 0.3))
        if not fast:
            windows._divert_unparsed = lambda *args: False  # type: ignore[method-assign]
        for offset, (key, value) in enumerate(log, start=1):
            windows.process(offset, T0 * 1000, key, value)
        outcomes.append(
            (
                [(b.offset, b.events, b.record) for b in windows.diverted],
                windows.counts["p"].admitted,
                windows.counts["p"].diverted,
                [(i.offset, i.reason) for i in windows.invalid],
                windows.events_in,
            )
        )
    assert outcomes[0] == outcomes[1]
    diverted, admitted, diverted_events, invalid, _ = outcomes[0]
    assert len(diverted) > 150 and admitted > 0 and diverted_events > 0
    assert [offset for offset, _ in invalid] == [301, 302, 303]  # foreign, not JSON, bad key
