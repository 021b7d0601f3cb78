"""The sink's per-partition window state machine: exactly-once objects under crashes.

A simulated log is fed through ``PartitionWindows`` while uploads complete in random
order, commits happen at random moments and the process "crashes" at random points
(losing everything not committed, sometimes after an upload landed but before the
commit). After the replay the fake S3 must hold every event exactly once.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import orjson
import pytest

from streamapp.contract import SHED_KEY, TICK_KEY
from streamapp.overflow import OverflowChunks
from streamapp.sink import overflow_record
from streamapp.sink.layout import KIND_MANIFEST_PART
from streamapp.sink.partition import DivertedBatch, PartitionWindows, Route
from tests.helpers import events_in

WINDOW = 10
LATENESS = 5
T0 = 1_800_000_000


def make_log(rng: random.Random, n: int, shed: bool = False) -> list[tuple[int, int, bytes, bytes]]:
    """Records of a few projects, mostly in order, some late, some batches, some ticks and garbage.

    With ``shed``, shed markers now and then divert part of p2's events or end its diversion.
    """
    log: list[tuple[int, int, bytes, bytes]] = []
    clock = float(T0)
    for offset in range(n):
        clock += rng.uniform(0.0, 0.6)
        ts_ms = int(clock * 1000)
        roll = rng.random()
        if shed and roll < 0.02:
            marker = (
                {"project_id": "p2", "mode": "divert", "fraction": 0.3}
                if rng.random() < 0.7
                else {
                    "project_id": "p2",
                    "mode": "ok",
                }
            )
            log.append((offset, ts_ms, SHED_KEY, orjson.dumps(marker)))
            continue
        if roll < 0.03:
            log.append((offset, ts_ms, TICK_KEY, orjson.dumps({"watermark": clock})))
            continue
        if roll < 0.05:
            log.append((offset, ts_ms, b"p1", b"\xffnot json"))
            continue
        project = f"p{rng.randrange(3)}"
        collection = rng.choice(["clicks", "views"])
        late = rng.random() < 0.08
        event_time = clock - (rng.uniform(20, 60) if late else rng.uniform(0, 2))
        stamp = _iso(event_time)
        count = rng.choice([1, 1, 1, 3, 7])
        events = [{"n": f"{offset}-{i}", "keen": {"timestamp": stamp}} for i in range(count)]
        body: dict[str, Any] = {"project_id": project, "collection": collection}
        if count == 1:
            body["event"] = events[0]
        else:
            body["events"] = events
        log.append((offset, ts_ms, project.encode(), orjson.dumps(body)))
    return log


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


def expected_ids(log: list[tuple[int, int, bytes, bytes]]) -> Counter[str]:
    ids: Counter[str] = Counter()
    for _, _, key, value in log:
        if key.startswith(b"\x00"):
            continue
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            continue
        for event in doc.get("events") or [doc["event"]]:
            ids[event["n"]] += 1
    return ids


def new_windows(checkpoint: dict[str, Any] | None, max_object_bytes: int = 10_000) -> PartitionWindows:
    return PartitionWindows(
        "events",
        0,
        window_seconds=WINDOW,
        lateness=LATENESS,
        max_object_bytes=max_object_bytes,
        max_event_bytes=10_000,
        max_record_bytes=100_000,
        target=lambda project: ("bucket", "pre"),
        manifest_target=("bucket", "pre"),
        checkpoint=checkpoint,
    )


def feed(windows: PartitionWindows, record: tuple[int, int, bytes, bytes]) -> None:
    offset, ts_ms, key, value = record
    if key == TICK_KEY:
        windows.tick(offset, orjson.loads(value)["watermark"])
    elif key == SHED_KEY:
        body = orjson.loads(value)
        route = Route(body["mode"], body["fraction"]) if body["mode"] == "divert" else None
        windows.marker(offset, body["project_id"], route)
    else:
        windows.process(offset, ts_ms, key, value)


def overflow_value(batch: DivertedBatch) -> bytes:
    """The overflow record the sink produces for a diverted record of source partition 0."""
    return overflow_record(0, batch.offset, batch.timestamp_ms, batch.record)


def drain_into(s3: dict[str, bytes], overflow: list[bytes]) -> None:
    """What the overflow drain writes for the overflow lane (its own crashes: tests/overflow/test_drain.py)."""
    chunks = OverflowChunks(
        "overflow", 0, window_seconds=WINDOW, max_events=50, max_bytes=1 << 20, target=lambda p: ("bucket", "pre")
    )
    for offset, value in enumerate(overflow):
        chunks.process(offset, b"p2", value)
    chunks.process(len(overflow), TICK_KEY, b"{}")
    for chunk in chunks.ready:
        for obj in chunk.objects:
            s3[obj.key] = obj.body()


def simulate(
    seed: int, n: int = 1500, crashes: int = 6, max_object_bytes: int = 10_000, shed: bool = False
) -> tuple[dict[str, bytes], list[tuple[int, int, bytes, bytes]]]:
    """Feed, upload, divert and commit at random; crash at random; replay. Returns (S3, log).

    Diversions are acked at random like uploads; at a crash some land in the overflow lane
    without their ack, others are lost with the process (the replay must divert them again).
    """
    rng = random.Random(seed)
    log = make_log(rng, n, shed)
    crash_at = sorted(rng.sample(range(50, n), crashes))
    s3: dict[str, bytes] = {}
    overflow: list[bytes] = []
    committed: tuple[int, dict[str, Any] | None] = (0, None)
    windows = new_windows(None, max_object_bytes)
    pending: list[Any] = []
    i = 0
    while True:
        if i < len(log):
            feed(windows, log[i])
            i += 1
        pending.extend(windows.outbox)
        windows.outbox.clear()
        pending.extend(windows.diverted)
        windows.diverted.clear()
        windows.invalid.clear()
        rng.shuffle(pending)
        while pending and rng.random() < 0.5:
            item = pending.pop()
            if isinstance(item, DivertedBatch):
                if rng.random() < 0.7:  # a produce can stay unacked while later uploads land
                    pending.insert(0, item)
                    continue
                overflow.append(overflow_value(item))
            else:
                s3[item.key] = item.body()
            windows.done(item.id)
        if rng.random() < 0.2:
            committed = windows.commit_point()
        if crash_at and i >= crash_at[0]:
            crash_at.pop(0)
            # Some uploads and diversions land without the commit that would follow them.
            for item in pending:
                if rng.random() < 0.3:
                    if isinstance(item, DivertedBatch):
                        overflow.append(overflow_value(item))
                    else:
                        s3[item.key] = item.body()
            pending = []
            offset, checkpoint = committed
            windows = new_windows(checkpoint, max_object_bytes)
            i = offset
            continue
        if i >= len(log) and not pending and not windows.outbox:
            if windows.open or windows.late:
                feed(windows, (len(log), 0, TICK_KEY, orjson.dumps({"watermark": T0 + 10 * n})))
                log.append((len(log), 0, TICK_KEY, orjson.dumps({"watermark": T0 + 10 * n})))
                i = len(log)
                continue
            break
    drain_into(s3, overflow)
    return s3, log


@pytest.mark.parametrize("seed", range(12))
def test_every_event_exactly_once_across_crashes(seed: int) -> None:
    s3, log = simulate(seed)
    want = expected_ids(log)
    got = events_in(s3)
    assert sum(want.values()) > 1000
    assert got == want


@pytest.mark.parametrize("seed", range(12))
def test_shed_project_exactly_once_across_crashes(seed: int) -> None:
    """Real-time share and diverted excess together hold every event once, whatever was acked."""
    s3, log = simulate(seed, shed=True)
    assert any(k.endswith("-delayed.json.gz") for k in s3), "some excess went the overflow way"
    assert events_in(s3) == expected_ids(log)


def test_exactly_once_with_size_rotation() -> None:
    s3, log = simulate(99, n=1200, crashes=8, max_object_bytes=600)
    assert events_in(s3) == expected_ids(log)
    assert sum(1 for k in s3 if k.endswith(".json.gz")) > 100  # rotation really cut objects


def test_restart_from_a_mid_run_checkpoint_writes_identical_keys_and_bytes() -> None:
    """A restart from the checkpoint of a mid-run commit writes again exactly what was not durable,
    under the same keys with the same bytes; the first run's durable objects and the restart's
    objects together are the uninterrupted run's output."""
    rng = random.Random(5)
    log = make_log(rng, 400)
    final_tick = (len(log), 0, TICK_KEY, orjson.dumps({"watermark": T0 + 10_000}))
    first = new_windows(None)
    written: dict[str, bytes] = {}  # every object of the uninterrupted run, durable or not
    durable: set[str] = set()  # keys durable when the checkpoint was taken
    pending: list[Any] = []
    checkpoint: tuple[int, dict[str, Any]] | None = None
    for i, record in enumerate([*log, final_tick]):
        feed(first, record)
        for obj in first.outbox:
            written[obj.key] = obj.body()
        pending.extend(first.outbox)
        first.outbox.clear()
        first.diverted.clear()
        first.invalid.clear()
        # Uploads land at random, some only after the checkpoint: the restart must write those again.
        still: list[Any] = []
        for obj in pending:
            if rng.random() < 0.4 or checkpoint is not None:
                first.done(obj.id)
                if checkpoint is None:
                    durable.add(obj.key)
            else:
                still.append(obj)
        pending = still
        if i == 200:
            checkpoint = first.commit_point()
    assert checkpoint is not None
    offset, state = checkpoint
    assert 0 < offset < 200, "the checkpoint holds back behind open windows and pending uploads"

    restarted = new_windows(orjson.loads(orjson.dumps(state)))  # as stored in S3: JSON round trip
    for record in log[offset:]:
        feed(restarted, record)
    feed(restarted, final_tick)
    again = {o.key: o.body() for o in restarted.outbox}

    assert again, "the restart writes what was not durable"
    rewritten = set(again) & set(written)
    assert {k: again[k] for k in rewritten} == {k: written[k] for k in rewritten}, "same keys, same bytes"
    assert set(again) == set(written) - durable, "exactly the objects not durable at the checkpoint"
    assert any(k not in durable for k in written if written[k] and k in again and "_manifests" not in k)
    assert len(durable) > 5 and len(again) > 5
    assert events_in({k: written[k] for k in durable} | again) == expected_ids(log)


def test_late_event_goes_to_late_object_of_its_window() -> None:
    windows = new_windows(None)
    on_time = {"project_id": "p", "collection": "c", "event": {"keen": {"timestamp": _iso(T0 + 100)}}}
    windows.process(0, (T0 + 100) * 1000, b"p", orjson.dumps(on_time))
    windows.process(
        1, (T0 + 130) * 1000, b"p", orjson.dumps(on_time | {"event": {"keen": {"timestamp": _iso(T0 + 130)}}})
    )
    late = {"project_id": "p", "collection": "c", "event": {"x": 1, "keen": {"timestamp": _iso(T0 + 101)}}}
    windows.process(2, (T0 + 131) * 1000, b"p", orjson.dumps(late))
    windows.tick(3, T0 + 1000)
    keys = [o.key for o in windows.outbox if o.kind != KIND_MANIFEST_PART]
    late_keys = [k for k in keys if k.endswith("-late.json.gz")]
    assert len(late_keys) == 1
    window = "2027-01-15T08:01:40.000Z"  # T0 + 100 s, floored to the 10 s window
    assert late_keys[0].startswith(f"pre/p/{window}/c/p-c-{window}-p0-o2"), late_keys[0]
    late_obj = next(o for o in windows.outbox if o.key == late_keys[0])
    assert late_obj.start == (T0 + 100) // WINDOW * WINDOW
    assert [orjson.loads(line)["x"] for line in (late_obj.body_lines or b"").splitlines()] == [1]


def test_invalid_records_are_reported_not_raised() -> None:
    windows = new_windows(None)
    windows.process(0, T0 * 1000, b"x", b"garbage")
    windows.process(1, T0 * 1000, b"x", b"[1, 2]")
    windows.process(2, T0 * 1000, b"x", orjson.dumps({"project_id": "../x", "collection": "c", "event": {}}))
    windows.process(3, T0 * 1000, b"p", orjson.dumps({"project_id": "p", "collection": "c", "events": [{}, 5]}))
    reasons = [item.reason for item in windows.invalid]
    assert len(reasons) == 4
    assert "not valid JSON" in reasons[0]
    assert "not an object" in reasons[1]
    assert "bad project_id" in reasons[2]
    assert "event 1 is not an object" in reasons[3]


def test_divert_route_sends_excess_to_overflow_deterministically() -> None:
    windows = new_windows(None)
    windows.marker(0, "p", Route("divert", 0.25))
    for offset in range(1, 2001):
        body = {"project_id": "p", "collection": "c", "event": {"keen": {"timestamp": _iso(T0)}}}
        windows.process(offset, T0 * 1000, b"p", orjson.dumps(body))
    counts = windows.counts["p"]
    assert counts.admitted + counts.diverted == 2000
    assert 0.2 < counts.admitted / 2000 < 0.3
    assert sum(b.events for b in windows.diverted) == counts.diverted
    # Diverted whole, as read: the drain enriches them (tests/overflow/test_raw_diversion_unit.py).
    assert all(b.record == orjson.dumps(body) for b in windows.diverted)


def test_records_delivered_again_after_a_seek_back_are_ignored() -> None:
    rng = random.Random(11)
    log = make_log(rng, 300)
    once, twice = new_windows(None), new_windows(None)
    for i, record in enumerate(log):
        feed(once, record)
        feed(twice, record)
        if i % 50 == 49:  # the consumer seeks back and the last records come again
            for again in log[i - 3 : i + 1]:
                feed(twice, again)
    for windows in (once, twice):
        feed(windows, (len(log), 0, TICK_KEY, orjson.dumps({"watermark": T0 + 10_000})))
    assert {o.key: o.body() for o in twice.outbox} == {o.key: o.body() for o in once.outbox}
    assert twice.events_in == once.events_in
    assert once.offset_gaps == twice.offset_gaps == 0


def test_a_jump_in_offsets_is_counted() -> None:
    log = make_log(random.Random(12), 20)
    windows = new_windows(None)
    for record in log[:5] + log[8:]:
        feed(windows, record)
    assert windows.offset_gaps == 1
    assert windows.backlog()["offset_gaps"] == 1


@pytest.mark.parametrize("seed", range(4))
def test_manifest_parts_list_exactly_the_on_time_objects_across_crashes(seed: int) -> None:
    """After crashes and replays, each window's manifest part lists exactly its on-time objects in
    S3, with their event counts and (uncompressed) byte sizes."""
    import gzip

    s3, _ = simulate(seed)
    parts = {k: orjson.loads(v) for k, v in s3.items() if "/_manifests/" in k}
    assert parts
    listed: dict[str, dict[str, Any]] = {}
    for part in parts.values():
        for entry in part["objects"]:
            listed[entry["key"]] = entry
        assert part["events"] == sum(o["events"] for o in part["objects"])
    on_time = {
        k: v for k, v in s3.items() if k.endswith(".json.gz") and not k.endswith(("-late.json.gz", "-delayed.json.gz"))
    }
    assert set(listed) == set(on_time)
    for key, body in on_time.items():
        data = gzip.decompress(body)
        assert (listed[key]["events"], listed[key]["bytes"]) == (len(data.splitlines()), len(data)), key
