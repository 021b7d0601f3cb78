"""The Meter without Kafka: counting, replay guard, decisions, markers, health, overrides.

A fake runtime stands in for the Faust app (assignor, producer, monitor), the control plane
and the sink; the tables are dicts that check every write happens with Faust's current event
set to the row's partition (what a real RocksDB table needs).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner
from faust.streams import current_event

from streamapp.contract import SHED_KEY, TICK_KEY
from streamapp.control import ControlView, override_record, quota_record
from streamapp.metering import sink_backlog_age, sink_is_idle
from streamapp.metering.counting import batch_event_count
from streamapp.metering.publishing import UNKNOWN_MARKER
from streamapp.metering.service import Meter
from streamapp.partitioning import key_partition as default_partition
from streamapp.settings import Settings
from streamapp.sink.partition import RouteCounts
from streamapp.tables.meter import MeterTables, decode_rates, decode_state

TOPIC = "events"


@dataclass
class Rec:
    """A raw record as the bulk transport hands them to the meter (timestamp in ms)."""

    key: bytes | None
    value: bytes | None
    offset: int
    partition: int
    timestamp: int
    topic: str = TOPIC


def rec(key: bytes | None, value: bytes | None, offset: int, partition: int, seconds: float) -> Rec:
    return Rec(key, value, offset, partition, int(seconds * 1000))


@dataclass
class Ev:
    message: Any


class FakeTable(dict):
    """A dict that insists on Faust's current event, like a RocksDB-backed Faust table."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[int, bytes]] = []

    def __setitem__(self, key: bytes, value: bytes) -> None:
        event = current_event()
        assert event is not None, "table write without a current event"
        self.writes.append((event.message.partition, key))
        super().__setitem__(key, value)


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, Any], int]] = []
        self.fail = False

    async def send(self, topic: str, key: bytes, value: bytes, partition: int, ts: Any, headers: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        if self.fail:
            fut.set_exception(RuntimeError("broker down"))
        else:
            self.sent.append((topic, key, orjson.loads(value), partition))
            fut.set_result(None)
        return fut


class FakeApp:
    def __init__(self, partitions: set[int]) -> None:
        from faust.types import TP

        self.actives = {TP(TOPIC, p) for p in partitions}
        self.producer = FakeProducer()
        self.monitor = type("M", (), {"send_latency": deque([0.002] * 10)})()
        self.assignor = type("A", (), {"assigned_actives": lambda _self: self.actives})()

    def create_event(self, key: Any, value: Any, headers: Any, message: Any) -> Any:
        return Ev(message)


class FakeControl:
    def __init__(self) -> None:
        self.view = ControlView()
        self.caught_up = asyncio.Event()
        self.caught_up.set()
        self.published: list[dict[str, Any]] = []

    async def publish(self, record: dict[str, Any]) -> None:
        self.published.append(record)


class FakeSink:
    def __init__(self) -> None:
        self.partitions: dict[int, Any] = {}
        self.backlog_info: dict[str, dict[str, Any]] = {}

    def backlog(self) -> dict[str, dict[str, Any]]:
        return self.backlog_info


class FakeRuntime:
    def __init__(self, settings: Settings, partitions: set[int]) -> None:
        self.settings = settings
        self.app = FakeApp(partitions)
        self.control = FakeControl()
        self.sink = FakeSink()


SETTINGS = Settings(
    events_topic=TOPIC,
    default_eps_limit=40.0,
    burst_horizon_seconds=5,
    sustained_horizon_seconds=6,
    shed_cooldown_seconds=5.0,
    window_seconds=2,
    allowed_lateness_seconds=1,
    idle_flush_seconds=1.0,
    health_backlog_seconds=10.0,
    unknown_projects="export",  # these tests meter projects they never create, each on its own
)


def new_meter(partitions: set[int] = frozenset({0, 1, 2, 3})) -> tuple[Meter, FakeRuntime]:
    runtime = FakeRuntime(SETTINGS, set(partitions))
    tables = MeterTables(rates=FakeTable(), states=FakeTable())  # type: ignore[arg-type]
    meter = Meter(runtime.app, runtime.settings, runtime.control, runtime.sink, tables)  # type: ignore[arg-type]
    meter.reload()
    return meter, runtime


def one(project: str, n: int = 0) -> bytes:
    return orjson.dumps({"project_id": project, "collection": "c", "event": {"n": n}})


def batch(project: str, count: int) -> bytes:
    return orjson.dumps({"project_id": project, "collection": "c", "events": [{"n": i} for i in range(count)]})


class Feed:
    """Records of a project at a given rate per second, with increasing offsets per partition."""

    def __init__(self) -> None:
        self.offsets: dict[int, int] = {}

    def second(self, project: str, partition: int, second: int, count: int) -> list[Rec]:
        out = []
        for i in range(count):
            offset = self.offsets.get(partition, 0)
            self.offsets[partition] = offset + 1
            out.append(rec(project.encode(), one(project, i), offset, partition, second + i / max(count, 1)))
        return out


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --------------------------------------------------------------- helpers


def test_batch_event_count_and_default_partition() -> None:
    assert batch_event_count(batch("p", 7)) == 7
    assert batch_event_count(one("p")) == 1
    assert batch_event_count(b'{"events": "not a list"}') == 1
    assert batch_event_count(b"\xffgarbage") == 1
    partitioner = DefaultPartitioner()
    for project in ("p00", "spiky", "project-7", "x"):
        assert default_partition(project, 4) == partitioner(project.encode(), [0, 1, 2, 3], [0, 1, 2, 3])


def test_sink_backlog_age_counts_only_the_delay_past_the_window_hold() -> None:
    now = 1000.0
    fresh = {"0": {"oldest_unflushed_age_seconds": 4.0, "read_lag": 0, "watermark": now}}
    assert sink_backlog_age(fresh, hold_seconds=4.0, now=now) == 0.0
    stuck = {"0": {"oldest_unflushed_age_seconds": 34.0, "read_lag": 0, "watermark": now - 30}}
    assert sink_backlog_age(stuck, hold_seconds=4.0, now=now) == 30.0
    behind = {"1": {"oldest_unflushed_age_seconds": 0.0, "read_lag": 5000, "watermark": now - 21}}
    assert sink_backlog_age(behind, hold_seconds=4.0, now=now) == 20.0
    assert sink_backlog_age({}, hold_seconds=4.0, now=now) == 0.0


def test_the_sink_is_idle_only_with_no_open_window_and_nothing_unread_in_any_partition() -> None:
    flushed = {"oldest_open_window": None, "read_lag": 0}
    assert sink_is_idle({"0": flushed, "1": flushed})
    assert sink_is_idle({})  # no partition: nothing the drain could delay
    assert not sink_is_idle({"0": flushed, "1": {"oldest_open_window": 1_700_000_000.0, "read_lag": 0}})
    assert not sink_is_idle({"0": flushed, "1": {"oldest_open_window": None, "read_lag": 3}})


def test_sink_backlog_age_counts_unread_records_only_for_as_long_as_they_stayed_unread() -> None:
    now = 1_800_000_000.0
    # The sink's own watermark tick in a partition idle for a minute, just written, not read yet.
    tick = {"0": {"oldest_unflushed_age_seconds": 0.0, "read_lag": 1, "watermark": now - 60, "unread_seconds": 0.0}}
    assert sink_backlog_age(tick, hold_seconds=4.0, now=now) == 0.0
    lasting = {
        "1": {"oldest_unflushed_age_seconds": 0.0, "read_lag": 5000, "watermark": now - 21, "unread_seconds": 30}
    }
    assert sink_backlog_age(lasting, hold_seconds=4.0, now=now) == 20.0
    growing = {"1": {"oldest_unflushed_age_seconds": 0.0, "read_lag": 5000, "watermark": now - 21, "unread_seconds": 3}}
    assert sink_backlog_age(growing, hold_seconds=4.0, now=now) == 3.0


# -------------------------------------------------------------- counting


def test_observe_counts_once_per_project_second_and_writes_one_row_per_project() -> None:
    meter, _ = new_meter()
    t = int(time.time()) - 3
    events = [
        rec(b"a", one("a"), 0, 2, t + 0.1),
        rec(b"a", one("a"), 1, 2, t + 0.5),
        rec(TICK_KEY, b'{"watermark": 1}', 2, 2, t + 0.6),
        rec(SHED_KEY, b'{"project_id": "a", "mode": "ok"}', 3, 2, t + 0.6),
        rec(b"a", one("a"), 4, 2, t + 1.2),
        rec(b"b", batch("b", 5), 0, 1, t + 0.3),
        rec(b"../bad", one("x"), 1, 1, t + 0.3),  # not a project id: not metered
    ]
    touched = meter.observe(events)
    assert {pm.project_id for pm in touched} == {"a", "b"}
    a, b = meter.projects["a"], meter.projects["b"]
    assert a.counts.counts(t) == (2, 2 * len(one("a"))) and a.counts.counts(t + 1) == (1, len(one("a")))
    assert b.counts.counts(t) == (5, len(batch("b", 5)))
    assert (a.received, b.received, a.offset, a.partition) == (3, 5, 4, 2)
    rates = meter.tables.rates
    assert sorted(rates.writes) == [(1, b"b"), (2, b"a")]  # one write per project, in its partition
    row = decode_rates(rates[b"a"])
    assert (row.partition, row.offset, row.received) == (2, 4, 3)
    assert row.counts.counts(t) == a.counts.counts(t)


def test_replayed_records_are_not_counted_twice_after_a_reload() -> None:
    meter, _ = new_meter()
    feed = Feed()
    t = int(time.time()) - 3
    first = feed.second("a", 0, t, 10) + feed.second("b", 0, t, 4)
    meter.observe(first)
    meter.reload()  # a rebalance: the rows are all the new owner has
    assert meter.floors == {0: 13}
    more = feed.second("a", 0, t + 1, 5)
    meter.observe(first + more)  # the sink's committed offset is behind: everything is re-read
    assert meter.projects["a"].received == 15 and meter.projects["b"].received == 4
    assert meter.projects["a"].counts.counts(t) == (10, 10 * len(one("a", 0)))


# ------------------------------------------------------------- decisions


def spike(meter: Meter, feed: Feed, project: str, partition: int, t0: int, steady: int, high: int) -> float:
    """``steady`` ev/s for 5 s then ``high`` ev/s for 3 s; returns the decision time."""
    for s in range(t0, t0 + 5):
        meter.observe(feed.second(project, partition, s, steady))
    for s in range(t0 + 5, t0 + 8):
        meter.observe(feed.second(project, partition, s, high))
    return t0 + 7.9


def test_spike_sheds_writes_marker_then_row_and_publishes() -> None:
    meter, runtime = new_meter()
    feed = Feed()
    t0 = int(time.time()) - 10
    now = spike(meter, feed, "a", 3, t0, 20, 800)
    meter.decide([meter.projects["a"]], now)
    pm = meter.projects["a"]
    assert pm.state.is_shed and pm.state.limit_eps == 40.0 and pm.state.episode == 1
    assert not meter.tables.states, "the row waits for the marker to be acked"
    run(meter.flush())
    ((topic, key, body, partition),) = runtime.app.producer.sent
    assert (topic, key, partition, body["mode"]) == (TOPIC, SHED_KEY, 3, "divert")
    # 800 events counted 0.9 s into the current second: the freshest rate reads 889/s.
    assert body["fraction"] == pytest.approx(40 / (800 / 0.9), rel=0.05)
    row = decode_state(meter.tables.states[b"a"])
    assert row.state == pm.state and row.marker == ("divert", body["fraction"]) and row.partition == 3
    (record,) = meter._queue()._queue  # type: ignore[attr-defined]
    assert record["type"] == "shed_state" and record["state"]["state"] == "shed"
    assert record["state"]["admit_fraction"] == body["fraction"]
    # Same rates again: nothing new to announce.
    meter.decide([pm], now + 0.05)
    run(meter.flush())
    assert len(runtime.app.producer.sent) == 1
    episodes = meter.shed()["episodes"]
    assert [(e["project_id"], e["end"]) for e in episodes] == [("a", None)]


def test_admit_fraction_is_announced_again_only_when_it_moves_over_15_percent() -> None:
    meter, runtime = new_meter()
    feed = Feed()
    t0 = int(time.time()) - 12
    now = spike(meter, feed, "a", 0, t0, 20, 800)
    meter.decide([meter.projects["a"]], now)
    run(meter.flush())
    meter.observe(feed.second("a", 0, t0 + 8, 880))  # +10 %: same marker
    meter.decide([meter.projects["a"]], t0 + 8.9)
    run(meter.flush())
    assert len(runtime.app.producer.sent) == 1
    for s in range(t0 + 9, t0 + 11):
        meter.observe(feed.second("a", 0, s, 400))  # halved: the admitted share doubles
    meter.decide([meter.projects["a"]], t0 + 10.9)
    run(meter.flush())
    assert len(runtime.app.producer.sent) == 2
    assert runtime.app.producer.sent[-1][2]["fraction"] > 1.15 * runtime.app.producer.sent[0][2]["fraction"]


def test_a_climbing_spike_is_shaped_on_the_current_second_not_only_on_whole_seconds() -> None:
    """A spike climbing 400 ev/s each second: the 3 s rates trail it (1,200/s at the decision)
    while the current second already holds 1,000 events at 0.5 s (2,000/s). The admitted share
    follows the current second, so the climb is not exported on time at 2x the quota."""
    meter, runtime = new_meter()
    feed = Feed()
    t0 = int(time.time()) - 10
    for s in range(t0, t0 + 5):
        meter.observe(feed.second("a", 1, s, 20))
    for i, s in enumerate(range(t0 + 5, t0 + 8)):
        meter.observe(feed.second("a", 1, s, 400 * (i + 1)))
    meter.observe(feed.second("a", 1, t0 + 8, 1000)[:1000])
    pm = meter.projects["a"]
    meter.decide([pm], t0 + 8.5)
    assert pm.state.is_shed
    assert pm.eps_shaping == pytest.approx(2000, rel=0.01)
    assert pm.fraction == pytest.approx(40 / 2000, rel=0.01)
    # Early in a second (10 events counted at 0.05 s) the extrapolation counts at least a quarter
    # of a second (40/s), and the last second is mostly the one before (10 + 0.95 x 1,000).
    meter.observe(feed.second("a", 1, t0 + 9, 10))
    meter.decide([pm], t0 + 9.05)
    assert pm.eps_shaping == pytest.approx(max(pm.counts.rate(t0 + 9, 3, 0.05)[0], 10 + 0.95 * 1000), rel=0.01)


def test_a_partition_behind_is_metered_on_its_records_clock() -> None:
    """A backlog: the records counted now were written 20 s ago. On the wall clock the spiking
    project would look quiet (admitted share 1: its whole backlog exported on time, the 2019
    spiral); on its partition's records clock it is 20x over its quota."""
    meter, runtime = new_meter()
    feed = Feed()
    t0 = int(time.time()) - 28  # records of 20-28 s ago, all counted now
    spike(meter, feed, "a", 2, t0, 20, 800)
    now = time.time()
    assert meter.record_lag(2, now) >= 20 and meter.record_lag(1, now) == 0
    pm = meter.projects["a"]
    meter.decide([pm], now)
    assert pm.state.is_shed and 0.03 <= pm.fraction <= 0.06  # ~40 ev/s of 800 (the wall clock: 1.0)
    # Caught up and quiet (nothing counted for a while): back on the wall clock.
    assert meter.record_lag(2, now + 5) == 0


def test_quiet_project_leaves_shed_only_after_the_cooldown() -> None:
    meter, runtime = new_meter()
    feed = Feed()
    t0 = int(time.time()) - 30
    now = spike(meter, feed, "a", 1, t0, 20, 800)
    pm = meter.projects["a"]
    meter.decide([pm], now)
    # Quiet from now on: the timer keeps deciding.
    t = now
    while pm.state.is_shed and t < now + 30:
        t += 1.0
        meter.decide([pm], t)
    below = 6 + 1  # the spike leaves the 6 s sustained window, then the 5 s cooldown
    assert not pm.state.is_shed and pm.state.since - now >= 5.0 and pm.state.since - now <= below + 5 + 1
    run(meter.flush())
    assert [b["mode"] for _, _, b, _ in runtime.app.producer.sent][-1] == "ok"
    (episode,) = meter.shed()["episodes"]
    assert episode["end"] == pm.state.since and episode["peak_eps"] > 100


def test_failed_marker_is_not_recorded_and_announced_again() -> None:
    meter, runtime = new_meter()
    feed = Feed()
    t0 = int(time.time()) - 10
    now = spike(meter, feed, "a", 0, t0, 20, 800)
    runtime.app.producer.fail = True
    meter.decide([meter.projects["a"]], now)
    run(meter.flush())
    assert meter.projects["a"].marker == UNKNOWN_MARKER
    assert b"a" not in meter.tables.states  # the row must not claim a marker Kafka never got
    runtime.app.producer.fail = False
    meter.decide([meter.projects["a"]], now + 0.1)
    run(meter.flush())
    assert [b["mode"] for _, _, b, _ in runtime.app.producer.sent] == ["divert"]
    assert decode_state(meter.tables.states[b"a"]).marker == meter.projects["a"].marker


def test_reload_recovers_state_and_states_the_route_again() -> None:
    meter, runtime = new_meter()
    feed = Feed()
    t0 = int(time.time()) - 10
    now = spike(meter, feed, "a", 2, t0, 20, 800)
    meter.decide([meter.projects["a"]], now)
    run(meter.flush())
    before = meter.projects["a"].state
    meter.reload()  # a rebalance that kept the partition
    assert meter.projects["a"].state == before and len(meter.shed()["episodes"]) == 1
    run(meter.flush())
    assert [b for _, _, b, _ in runtime.app.producer.sent][-1] == runtime.app.producer.sent[0][2]
    # A new process on the same (recovered) tables.
    fresh = Meter(runtime.app, runtime.settings, runtime.control, runtime.sink, meter.tables)  # type: ignore[arg-type]
    fresh.reload()
    assert fresh.projects["a"].state == before and fresh.projects["a"].marker == meter.projects["a"].marker
    (episode,) = fresh.shed()["episodes"]
    assert episode["recovered"] is True and episode["start"] == before.since
    # Partitions this worker no longer owns are forgotten.
    runtime.app.actives = set()
    meter.reload()
    assert meter.projects == {}


def test_shadow_and_drop_modes_come_from_the_project_settings() -> None:
    meter, runtime = new_meter()
    runtime.control.view.apply(quota_record("a", shed_mode="shadow"))
    runtime.control.view.apply(quota_record("b", shed_mode="drop", quota_eps=1000.0))
    feed = Feed()
    t0 = int(time.time()) - 10
    now = spike(meter, feed, "a", 0, t0, 20, 800)
    spike(meter, feed, "b", 1, t0, 20, 800)
    meter.decide([meter.projects["a"], meter.projects["b"]], now)
    run(meter.flush())
    assert [(b["project_id"], b["mode"]) for _, _, b, _ in runtime.app.producer.sent] == [("a", "shadow")]
    assert not meter.projects["b"].state.is_shed  # its own quota: 1000 ev/s
    assert meter.top(5)[0]["quota_eps"] in (40.0, 1000.0)


def test_manual_override_wins_until_cleared() -> None:
    meter, runtime = new_meter()
    feed = Feed()
    t = int(time.time()) - 5
    for s in range(t, t + 3):
        meter.observe(feed.second("a", 0, s, 10))
    pm = meter.projects["a"]
    runtime.control.view.apply(override_record("a", "shed", "incident 42", mode="drop"))
    meter.decide([pm], t + 3.0)
    assert pm.state.is_shed and pm.state.manual == "shed" and pm.state.mode == "drop"
    assert pm.marker == ("drop", 1.0)  # under its quota: a manual shed still admits the quota
    runtime.control.view.apply(override_record("a", "clear"))
    meter.decide([pm], t + 4.0)
    assert pm.state.manual is None
    meter.decide([pm], t + 4.0 + SETTINGS.shed_cooldown_seconds)
    assert not pm.state.is_shed and pm.marker is None


def test_manual_shed_of_a_project_not_seen_yet_on_this_workers_partition() -> None:
    partition = default_partition("newcomer", 4)
    meter, runtime = new_meter({partition})
    other, _ = new_meter({(partition + 1) % 4})
    for m in (meter, other):
        m.control.view.apply(override_record("newcomer", "shed", "pre-emptive"))
        m._tick(time.time())
    assert meter.projects["newcomer"].state.is_shed
    assert "newcomer" not in other.projects


def test_health_tightens_only_the_heaviest_projects() -> None:
    meter, runtime = new_meter()
    feed = Feed()
    t = int(time.time()) - 8
    rates = {"h1": 30, "h2": 28, "h3": 26, "light": 5, "mid": 20}
    for s in range(t, t + 7):
        for i, (project, rate) in enumerate(rates.items()):
            meter.observe(feed.second(project, i % 4, s, rate))
    pms = list(meter.projects.values())
    now = t + 6.99
    meter.decide(pms, now)
    assert not any(pm.state.is_shed for pm in pms)  # all under 40 ev/s
    # The sink is 20 s behind (threshold 10 s): factor 0.5 for the 3 heaviest.
    runtime.sink.backlog_info = {"0": {"oldest_unflushed_age_seconds": 20.0 + 4.0, "read_lag": 0}}
    meter.update_health(now)
    assert meter.health["factor"] == 0.5
    assert meter.tightened == {"h1": 0.5, "h2": 0.5, "h3": 0.5}
    meter.decide(pms, now + 0.005)
    shed = {pm.project_id for pm in pms if pm.state.is_shed}
    assert shed == {"h1", "h2", "h3"}  # 30/28/26 ev/s > 20 ev/s tightened quota
    assert meter.projects["h1"].state.limit_eps == 20.0
    # Health returns: limits relax (the shed ones leave after the cooldown as usual).
    runtime.sink.backlog_info = {}
    meter.update_health(now + 1)
    assert meter.tightened == {} and meter.effective_quota("h1").eps == 40.0


def test_counters_merge_the_sinks_routing_counts() -> None:
    meter, runtime = new_meter()
    feed = Feed()
    meter.observe(feed.second("a", 0, int(time.time()) - 2, 10))
    windows = type("W", (), {})()
    windows.counts = {"a": RouteCounts(admitted=6, diverted=3, dropped=1), "z": RouteCounts(admitted=2)}
    runtime.sink.partitions = {0: windows}
    counters = meter.counters()
    assert counters["a"] == {
        "received": 10,
        "admitted": 6,
        "diverted": 3,
        "dropped": 1,
        "bytes": 10 * len(one("a", 0)),
        "shadow_excess": 0,
    }
    assert counters["z"]["admitted"] == 2 and counters["z"]["received"] == 0
    series = meter.series("a", 3)
    assert [row["events"] for row in series] == [10, 0, 0] and meter.series("nope", 3) == []


def test_operator_records_are_validated() -> None:
    assert quota_record("p", quota_eps=5.0) == {"type": "quota", "project_id": "p", "quota_eps": 5.0}
    reset = quota_record("p", reset=True)
    assert reset == {
        "type": "quota",
        "project_id": "p",
        "quota_eps": None,
        "quota_bps": None,
        "burst": None,
        "shed_mode": None,
    }
    view = ControlView()
    view.apply(quota_record("p", quota_eps=5.0, shed_mode="drop"))
    view.apply(quota_record("p", burst=1.0))
    assert (view.projects["p"].quota_eps, view.projects["p"].burst, view.projects["p"].shed_mode) == (5.0, 1.0, "drop")
    view.apply(reset)
    assert view.projects["p"].quota_eps is None and view.projects["p"].shed_mode is None
    for bad in ({"quota_eps": 0.0}, {"quota_bps": -1.0}, {"burst": -0.1}, {"shed_mode": "queue"}):
        with pytest.raises(ValueError):
            quota_record("p", **bad)  # type: ignore[arg-type]
    shed = override_record("p", "shed", "why", mode="shadow")
    assert (shed["action"], shed["reason"], shed["mode"]) == ("shed", "why", "shadow")
    with pytest.raises(ValueError):
        override_record("p", "pause")


def test_rate_rows_are_coalesced_to_one_write_per_project_per_interval() -> None:
    meter, _ = new_meter()
    feed = Feed()
    t = int(time.time()) - 3
    for s in range(t, t + 3):
        meter.observe(feed.second("a", 0, s, 50) + feed.second("b", 1, s, 5))
    rates = meter.tables.rates
    assert sorted(rates.writes) == [(0, b"a"), (1, b"b")]  # the first batch; the next two wait
    assert decode_rates(rates[b"a"]).received == 50
    run(meter.tick())  # the timer writes what waited
    assert len(rates.writes) == 4 and decode_rates(rates[b"a"]).received == 150
    assert decode_rates(rates[b"a"]).offset == meter.projects["a"].offset
    meter.observe(feed.second("a", 0, t + 3, 1))
    meter.revoke()  # a rebalance writes what is counted before the partitions go
    assert decode_rates(rates[b"a"]).received == 151 and not meter.ready
