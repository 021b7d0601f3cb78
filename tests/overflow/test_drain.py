"""The overflow drain's chunking state machine: exactly-once delayed objects under crashes and re-sends.

A simulated overflow log (what the sink diverts, including the re-sends a sink crash causes,
with the same source positions) is fed through ``OverflowChunks`` while the process "crashes"
at random points: uploads of the chunk being delivered may or may not land, the commit may
not happen (ready chunks are delivered in groups, as the drain does, with one commit per group).
After every restart from the committed offset's checkpoint, the fake S3 must hold every diverted
event exactly once.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import orjson
import pytest

from streamapp.contract import TICK_KEY, position
from streamapp.overflow.chunks import SEEN_WINDOW, OverflowChunks, SeenOffsets
from streamapp.overflow.drain import CHUNKS_PER_DELIVERY
from streamapp.sink.diversions import DIVERTED_HEAD, overflow_record
from streamapp.sink.layout import KIND_DELAYED, object_key
from tests.helpers import earlier_overflow_record, events_in

WINDOW = 10
T0 = 1_800_000_000


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


Record = tuple[int, bytes, bytes]


def make_log(rng: random.Random, n: int, whole: bool = True) -> tuple[list[Record], Counter[str]]:
    """Overflow records of two source partitions (one lane); some re-sent later (sink crash).

    ``whole``: records diverted whole, as this version's sink does; else an earlier version's
    records (events already enriched, the excess share of a batch record)."""
    log: list[Record] = []
    want: Counter[str] = Counter()
    next_offset = {0: 0, 4: 0}  # source partition -> next source offset
    sent: list[bytes] = []
    clock = float(T0)
    while len(log) < n:
        offset = len(log)
        roll = rng.random()
        if roll < 0.04:
            log.append((offset, TICK_KEY, b"{}"))
            continue
        if roll < 0.05:
            log.append((offset, b"p1", b"\xffnot json"))
            continue
        if roll < 0.15 and sent:
            # A sink crash re-diverts from its committed point: the last few records again, in order.
            for value in sent[-rng.randint(1, 4) :]:
                log.append((len(log), b"p", value))
            continue
        if roll < 0.2 and len(log) > 2 and not log[-1][1].startswith(b"\x00"):
            # Two diversions produced concurrently land in the other order.
            previous = log.pop()
            log.append((offset - 1, *_next_record(rng, sent, want, next_offset, clock, whole)))
            log.append((offset, previous[1], previous[2]))
            continue
        clock += rng.uniform(0.0, 0.8)
        log.append((offset, *_next_record(rng, sent, want, next_offset, clock, whole)))
    return log, want


def _next_record(
    rng: random.Random,
    sent: list[bytes],
    want: Counter[str],
    next_offset: dict[int, int],
    clock: float,
    whole: bool,
) -> tuple[bytes, bytes]:
    source = rng.choice([0, 4])
    src_offset = next_offset[source]
    next_offset[source] += rng.randint(1, 3)
    project = rng.choice(["p1", "p2", "p3"])
    count = rng.choice([1, 1, 2, 5])
    # Whole: all of a source record's events; earlier: the excess share of a batch record.
    indexes = list(range(count)) if whole else sorted(rng.sample(range(8), count))
    events = []
    for i in indexes:
        name = f"{source}-{src_offset}-{i}"
        events.append({"n": name, "keen": {"timestamp": _iso(clock - rng.uniform(0, 3)), "id": name}})
        want[name] += 1
    collection = rng.choice(["clicks", "views"])
    if whole:
        record = orjson.dumps({"project_id": project, "collection": collection, "events": events})
        value = overflow_record(source, src_offset, int(clock * 1000), record)
    else:
        value = earlier_overflow_record(
            project, collection, source, [position(src_offset, i) for i in indexes], [orjson.dumps(e) for e in events]
        )
    sent.append(value)
    return project.encode(), value


def new_chunks(checkpoint: dict[str, Any] | None, max_events: int = 40) -> OverflowChunks:
    return OverflowChunks(
        "events-overflow",
        3,
        window_seconds=WINDOW,
        max_events=max_events,
        max_bytes=1_000_000,
        target=lambda project: None if project == "p3" else ("bucket", "pre"),
        checkpoint=checkpoint,
    )


def simulate(seed: int, n: int = 1500, crashes: int = 8, max_events: int = 40, whole: bool = True) -> dict[str, bytes]:
    """Deliver as ``OverflowDrain`` does: records in fetched batches, the ready chunks in groups of
    ``CHUNKS_PER_DELIVERY`` (all of a group's objects at once, then the last chunk's checkpoint and
    commit). A crash lands a random share of the group's objects and commits nothing."""
    rng = random.Random(seed)
    log, _ = make_log(rng, n, whole)
    log.append((len(log), TICK_KEY, b"{}"))  # the drain ticks an idle lane at the end
    crash_at = sorted(rng.sample(range(20, n), crashes))
    s3: dict[str, bytes] = {}
    committed: tuple[int, dict[str, Any] | None] = (0, None)
    chunks = new_chunks(None, max_events)
    i = 0
    while i < len(log):
        fetched = log[i : i + rng.randint(1, 4 * max_events)]  # one fetch: up to a few chunks' worth
        for offset, key, value in fetched:
            chunks.process(offset, key, value)
        i += len(fetched)
        crashed = bool(crash_at) and i >= crash_at[0]
        ready, chunks.ready = chunks.ready, []
        for start in range(0, len(ready), CHUNKS_PER_DELIVERY):
            group = ready[start : start + CHUNKS_PER_DELIVERY]
            for obj in (obj for chunk in group for obj in chunk.objects):
                if not crashed or rng.random() < 0.5:  # a crash mid-delivery lands some objects
                    s3[obj.key] = obj.body()
            if crashed:
                break
            last = group[-1]
            s3[f"_checkpoints/{last.commit_offset}"] = orjson.dumps(last.checkpoint)
            committed = (last.commit_offset, last.checkpoint)
        if crashed:
            crash_at = [at for at in crash_at if at > i]
            offset, checkpoint = committed
            chunks = new_chunks(checkpoint, max_events)
            i = offset
    return s3


def projects_of(s3: dict[str, bytes]) -> set[str]:
    return {key.split("/")[1] for key in s3 if key.endswith(".json.gz")}


@pytest.mark.parametrize("whole", [True, False], ids=["whole-records", "earlier-format"])
@pytest.mark.parametrize("seed", range(10))
def test_every_diverted_event_exactly_once_across_crashes_and_resends(seed: int, whole: bool) -> None:
    rng = random.Random(seed)
    log, want = make_log(rng, 1500, whole)
    s3 = simulate(seed, whole=whole)
    got = events_in(s3)
    # p3 does not export: its excess is consumed, never written.
    names = _names_of(log, exclude="p3")
    exported = Counter({name: 1 for name in want if name in names})
    assert sum(exported.values()) > 500
    assert got == exported
    assert projects_of(s3) == {"p1", "p2"}
    assert all("-delayed.json.gz" in k for k in s3 if k.endswith(".json.gz"))


def _names_of(log: list[Record], exclude: str) -> set[str]:
    names = set()
    for _, key, value in log:
        if key.startswith(b"\x00"):
            continue
        try:
            doc = orjson.loads(value.partition(b"\n")[2] if value.startswith(DIVERTED_HEAD) else value)
        except orjson.JSONDecodeError:
            continue
        if doc["project_id"] != exclude:
            names.update(e["n"] for e in doc["events"])
    return names


@pytest.mark.parametrize("whole", [True, False], ids=["whole-records", "earlier-format"])
def test_replay_from_a_checkpoint_writes_identical_keys_and_bytes(whole: bool) -> None:
    log, _ = make_log(random.Random(3), 600, whole)
    first = new_chunks(None)
    for record in log:
        first.process(*record)
    chunks = list(first.ready)
    assert len(chunks) > 5
    middle = chunks[len(chunks) // 2]
    again = new_chunks(middle.checkpoint)
    for record in log[middle.commit_offset :]:
        again.process(*record)
    later = {o.key: o.body() for c in chunks if c.commit_offset > middle.commit_offset for o in c.objects}
    assert {o.key: o.body() for c in again.ready for o in c.objects} == later


def test_chunk_is_cut_by_count_and_by_tick_and_names_its_first_offset() -> None:
    chunks = new_chunks(None, max_events=3)

    def record(source_offset: int, n: int) -> bytes:
        return orjson.dumps(
            {
                "project_id": "p1",
                "collection": "c",
                "source_partition": 3,
                "positions": [position(source_offset, i) for i in range(n)],
                "events": [{"n": i, "keen": {"timestamp": _iso(T0 + 1)}} for i in range(n)],
            }
        )

    chunks.process(0, TICK_KEY, b"{}")  # tick on an empty chunk: moves the commit point only
    assert [(c.commit_offset, c.objects) for c in chunks.ready] == [(1, [])]
    chunks.ready.clear()
    chunks.process(1, b"p1", record(10, 2))
    assert not chunks.ready and chunks.pending_events == 2
    chunks.process(2, b"p1", record(11, 2))  # 4 >= 3: cut after the whole record
    (chunk,) = chunks.ready
    assert (chunk.first_offset, chunk.commit_offset, chunk.events) == (1, 3, 4)
    start = (T0 + 1) // WINDOW * WINDOW
    assert [o.key for o in chunk.objects] == [object_key("pre", "p1", "c", start, KIND_DELAYED, 3, position(1))]
    assert chunk.objects[0].key.endswith("-d3-o1-delayed.json.gz")
    assert chunk.checkpoint["offset"] == 3
    assert SeenOffsets.from_json(chunk.checkpoint["seen"]["3"]).top == 11
    chunks.ready.clear()
    chunks.process(3, b"p1", record(11, 2))  # a re-send: skipped whole
    chunks.process(4, b"p1", record(12, 1))
    chunks.process(5, TICK_KEY, b"{}")
    (chunk,) = chunks.ready
    assert (chunk.first_offset, chunk.commit_offset, chunk.events) == (4, 6, 1)
    assert chunks.duplicates == 2


def test_seen_offsets_accept_late_originals_and_reject_resends() -> None:
    seen = SeenOffsets()
    assert not seen.has(0)
    for offset in (10, 12, 11, 40):
        assert not seen.has(offset)
        seen.add(offset)
    assert all(seen.has(o) for o in (10, 11, 12, 40))
    assert not seen.has(13) and not seen.has(39) and not seen.has(41)
    seen.add(40 + SEEN_WINDOW)
    assert seen.has(40) and seen.has(13), "beyond the window: taken as delivered"
    assert seen.has(40 + SEEN_WINDOW) and not seen.has(41), "inside the window: exact"
    again = SeenOffsets.from_json(seen.to_json())
    assert (again.top, again.bits) == (seen.top, seen.bits)
    assert len(orjson.dumps(seen.to_json())) < 12_000


def test_out_of_order_originals_are_delivered_and_resends_skipped() -> None:
    chunks = new_chunks(None, max_events=100)

    def record(source_offset: int) -> bytes:
        return orjson.dumps(
            {
                "project_id": "p1",
                "collection": "c",
                "source_partition": 3,
                "positions": [position(source_offset)],
                "events": [{"n": source_offset, "keen": {"timestamp": _iso(T0)}}],
            }
        )

    for offset, source_offset in enumerate([5, 7, 6, 9, 8, 7, 5, 10, 6]):
        chunks.process(offset, b"p1", record(source_offset))
    chunks.process(9, TICK_KEY, b"{}")
    lines = [orjson.loads(line)["n"] for obj in chunks.ready[0].objects for line in obj.data.splitlines()]
    assert lines == [5, 7, 6, 9, 8, 10] and chunks.duplicates == 3


def test_restore_skips_records_before_the_checkpoint() -> None:
    seen = SeenOffsets()
    seen.add(100)
    chunks = new_chunks({"offset": 5, "seen": {"0": seen.to_json()}})
    value = orjson.dumps(
        {
            "project_id": "p1",
            "collection": "c",
            "source_partition": 0,
            "positions": [position(100), position(101)],
            "events": [{"n": "old", "keen": {"timestamp": _iso(T0)}}, {"n": "new", "keen": {"timestamp": _iso(T0)}}],
        }
    )
    chunks.process(4, b"p1", value)  # before the restore point
    assert chunks.pending_events == 0
    chunks.process(5, b"p1", value)
    assert chunks.pending_events == 1 and chunks.duplicates == 1
    chunks.process(6, TICK_KEY, b"{}")
    assert [orjson.loads(line)["n"] for line in chunks.ready[0].objects[0].data.splitlines()] == ["new"]
