"""Many projects at unit level (issue 9, item 7): memory per project, idle eviction, view latency.

Against the in-process read model (a real ``Meter``, real ``PartitionWindows``, real ``Metrics``
and the read views on a stand-in runtime): 100,000 projects that sent one event each, then went idle,
must cost < 100 MB and be forgotten; /rates/, /shed/, /sink/ and /metrics over 100,000 active
projects must answer in < 100 ms. The end-to-end check on a worker is tests/metering/test_cardinality.py.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
import tracemalloc
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamapp.control import ControlView, ProjectSettings
from streamapp.metering import OTHER, read_model
from streamapp.metering.eviction import EVICT_BATCH
from streamapp.metering.read_model import READ_MODEL_SLICE, TOP_SELECTION_LIMIT
from streamapp.metering.second_counts import SecondCounts
from streamapp.metering.service import Meter
from streamapp.metering.unknown import UNKNOWN_FLOW, shared_meter_id
from streamapp.metering.views import MeteringViews
from streamapp.metrics import Metrics, ScrapeSources
from streamapp.settings import Settings
from streamapp.sink import ParkingBook
from streamapp.sink.partition import PartitionWindows, Route
from streamapp.sink.s3 import S3Stats
from streamapp.sink.service import S3Sink
from streamapp.sink.uploads import FairQueue
from streamapp.sink.views import SinkViews
from streamapp.tables.meter import MeterTables
from streamapp.web.cluster import Cluster

TOPIC = "events"
PARTITIONS = 4
N_PROJECTS = 100_000
VIEW_BUDGET_SECONDS = 0.100


@dataclass(slots=True)
class Rec:
    key: bytes | None
    value: bytes | None
    offset: int
    partition: int
    timestamp: int  # ms, like the bulk transport's raw records


class FakeApp:
    def __init__(self) -> None:
        from faust.types import TP

        self.actives = {TP(TOPIC, p) for p in range(PARTITIONS)}
        self.monitor = type("M", (), {"send_latency": deque([0.002] * 10)})()
        self.assignor = type("A", (), {"assigned_actives": lambda _self: self.actives})()
        self.conf = type("C", (), {"canonical_url": "http://127.0.0.1:1"})()
        self.consumer = type("K", (), {"highwater": lambda _self, tp: 0})()


class FakeControl:
    def __init__(self) -> None:
        self.view = ControlView()
        self.caught_up = asyncio.Event()
        self.caught_up.set()


class FakeRuntime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = FakeApp()
        self.control = FakeControl()
        self.s3 = type("S", (), {"stats": S3Stats(), "on_put": []})()
        self.sink = S3Sink(  # the real one, its partitions set by hand
            app=self.app,  # type: ignore[arg-type]
            settings=settings,
            s3=self.s3,  # type: ignore[arg-type]
            checkpoints=None,  # type: ignore[arg-type]
            parking=None,  # type: ignore[arg-type]
            overflow=None,  # type: ignore[arg-type]
            control=self.control,  # type: ignore[arg-type]
            export_target=lambda project_id: ("bucket", "events"),
            invalid_topic="",
            overflow_topic="",
            objects_topic="",
            metrics=None,  # type: ignore[arg-type]
            spawn=lambda coro: None,
        )
        self.parking = type("P", (), {"book": ParkingBook(settings.s3_parked_retry_seconds)})()  # nothing parked
        self.meter: Any = None

    def drain_status(self) -> dict[str, Any]:
        """An idle overflow drain's status (``OverflowDrain.status`` with nothing assigned)."""
        return {"partitions": {}, "offsets_behind": 0, "rate_eps": 0.0, "delayed_objects": 0, "events_delivered": 0}


def settings_for(policy: str) -> Settings:
    return Settings(events_topic=TOPIC, topic_partitions=PARTITIONS, window_seconds=5, unknown_projects=policy)


def new_meter(policy: str = "export") -> tuple[Meter, FakeRuntime]:
    runtime = FakeRuntime(settings_for(policy))
    meter = Meter(runtime.app, runtime.settings, runtime.control, runtime.sink, MeterTables(rates={}, states={}))  # type: ignore[arg-type]
    meter.write_rates = lambda: meter._dirty.clear()  # type: ignore[method-assign] - no Faust tables
    meter.reload()
    runtime.meter = meter
    for p in range(PARTITIONS):
        runtime.sink.partitions[p] = PartitionWindows(
            TOPIC,
            p,
            window_seconds=5,
            lateness=2,
            max_object_bytes=1 << 26,
            max_event_bytes=100_000,
            max_record_bytes=1_000_000,
            target=lambda project_id: ("bucket", "events"),
            manifest_target=("bucket", "events"),
            known=lambda project_id: project_id in runtime.control.view.projects,
            unknown_policy=policy,
        )
    return meter, runtime


def one_event_records(n: int, now_ms: int, prefix: str = "inv") -> dict[int, list[Rec]]:
    """``n`` records of ``n`` distinct project ids (one event each), by partition."""
    by_partition: dict[int, list[Rec]] = {p: [] for p in range(PARTITIONS)}
    for i in range(n):
        project = f"{prefix}-{i}"
        value = orjson.dumps({"project_id": project, "collection": "c", "event": {"n": i}})
        p = i % PARTITIONS
        by_partition[p].append(Rec(project.encode(), value, len(by_partition[p]), p, now_ms))
    return by_partition


def feed(meter: Meter, runtime: FakeRuntime, by_partition: dict[int, list[Rec]]) -> None:
    """Meter and sink the records as the two agents do, one fetched batch (<= 5,000) at a time."""
    for p, records in by_partition.items():
        windows = runtime.sink.partitions[p]
        for i in range(0, len(records), 5000):
            batch = records[i : i + 5000]
            meter.observe(batch)
            for r in batch:
                windows.process(r.offset, r.timestamp, r.key, r.value)


def flush_everything(runtime: FakeRuntime, watermark: float) -> int:
    """Close every window and acknowledge every upload, as if S3 had them; commit points taken."""
    written = 0
    for windows in runtime.sink.partitions.values():
        windows.tick(windows.read_offset, watermark)
        for obj in windows.outbox:
            windows.done(obj.id)
            written += 1
        windows.outbox.clear()
        windows.commit_point()
        windows.commit_point()  # the second one forgets what the first reported as durable
    return written


def traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


# ---------------------------------------------------------------------------------- memory
MEASURED_PROJECTS = 10_000  # tracemalloc slows the feed ~10x: bytes per project from 10,000 (linear)


def test_bytes_per_project_open_idle_and_forgotten() -> None:
    """State per one-event project (meter + sink), measured with tracemalloc: 100,000 idle projects
    must fit in 100 MB before they are forgotten, and almost nothing once they are."""
    meter, runtime = new_meter("export")
    now = time.time()
    records = one_event_records(MEASURED_PROJECTS, int(now * 1000))
    tracemalloc.start()
    try:
        base = traced()
        feed(meter, runtime, records)
        open_bytes = traced() - base
        assert flush_everything(runtime, now + 60) >= MEASURED_PROJECTS
        idle_bytes = traced() - base
        assert meter.evict_idle(now + meter.idle_seconds + 2) == MEASURED_PROJECTS  # < EVICT_BATCH: one pass
        after_bytes = traced() - base
    finally:
        tracemalloc.stop()
    per = {
        name: b / MEASURED_PROJECTS for name, b in (("open", open_bytes), ("idle", idle_bytes), ("after", after_bytes))
    }
    print(
        f"\nbytes per one-event project: {per['open']:.0f} with its window open, {per['idle']:.0f} idle,"
        f" {per['after']:.0f} after it was forgotten (x100,000: {per['idle'] * N_PROJECTS / 1e6:.0f} MB idle,"
        f" {per['after'] * N_PROJECTS / 1e6:.0f} MB forgotten)"
    )
    assert per["idle"] * N_PROJECTS < 100e6
    # What stays is fixed-size (dict tables of the partitions) plus the name-check cache of
    # streamapp.contract (bounded to 100,000 names): a fraction of the idle state.
    assert per["after"] < per["idle"] / 3


def test_eviction_keeps_shed_overridden_and_recent_projects() -> None:
    meter, runtime = new_meter("export")
    now = time.time()
    records = one_event_records(6, int((now - 400) * 1000), prefix="old")
    feed(meter, runtime, records)
    feed(
        meter,
        runtime,
        {0: [Rec(b"fresh", b'{"project_id":"fresh","collection":"c","event":{}}', 99, 0, int(now * 1000))]},
    )
    shed = meter.projects["old-0"]
    shed.state = type(shed.state)("old-0", state="shed")
    meter._watch(shed)
    meter.projects["old-1"].marker = ("divert", 0.5)
    runtime.control.view.overrides["old-2"] = {"action": "unshed"}
    assert meter.evict_idle(now) == 3
    assert set(meter.projects) == {"old-0", "old-1", "old-2", "fresh"}
    # A forgotten project that sends again is metered from scratch.
    feed(
        meter,
        runtime,
        {1: [Rec(b"old-5", b'{"project_id":"old-5","collection":"c","event":{}}', 50, 1, int(now * 1000))]},
    )
    assert meter.projects["old-5"].received == 1


# ---------------------------------------------------------------------------------- views


REFRESHES: list[float] = []  # the tick's pass over every project (in slices: see the test below)


def _tick(meter: Meter, runtime: FakeRuntime) -> None:
    """What the worker's 1 s meter tick does for the read model: the selection, the totals and
    the sink backlog (through the health check)."""
    started = time.perf_counter()
    asyncio.run(meter.refresh_read_model(time.time()))
    runtime.sink.backlog()
    REFRESHES.append(time.perf_counter() - started)


def _timed(fn: Any, meter: Meter, runtime: FakeRuntime, repeat: int = 5) -> tuple[float, float, Any]:
    """(median, max) of ``repeat`` requests, each after a tick (the tick runs every second)."""
    times, result = [], None
    for _ in range(repeat):
        _tick(meter, runtime)
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), max(times), result


@pytest.fixture(scope="module")
def many_projects() -> tuple[Meter, FakeRuntime, float]:
    """100,000 one-event projects and a hot one, metered and windowed (shared by the tests below)."""
    meter, runtime = new_meter("export")
    now = time.time()
    feed(meter, runtime, one_event_records(N_PROJECTS, int(now * 1000)))
    hot = [
        Rec(
            b"hot",
            orjson.dumps({"project_id": "hot", "collection": "c", "event": {"n": i}}),
            N_PROJECTS + i,
            1,
            int(now * 1000),
        )
        for i in range(500)
    ]
    feed(meter, runtime, {1: hot})
    return meter, runtime, now


def test_views_and_metrics_under_100_ms_with_100000_projects(many_projects: tuple[Meter, FakeRuntime, float]) -> None:
    meter, runtime, _ = many_projects
    meter.projects["inv-7"].state = type(meter.projects["inv-7"].state)("inv-7", state="shed")
    meter._watch(meter.projects["inv-7"])
    assert len(meter.projects) == N_PROJECTS + 1
    cluster = Cluster(runtime.app, runtime.settings)  # type: ignore[arg-type]
    views = MeteringViews(runtime.settings, meter, runtime.control.view, cluster)  # type: ignore[arg-type]
    sink_views = SinkViews(
        runtime.app,  # type: ignore[arg-type]
        runtime.sink,
        runtime.s3,  # type: ignore[arg-type]
        runtime.parking,  # type: ignore[arg-type]
        runtime.drain_status,
        cluster,
    )
    metrics = Metrics()
    metrics.bind(
        ScrapeSources(meter, runtime.sink, runtime.s3, runtime.parking, runtime.drain_status)  # type: ignore[arg-type]
    )

    timings: dict[str, tuple[float, float]] = {}
    for name, fn in (
        ("/rates/", lambda: views.local_rates(20, 0)),
        ("/shed/", views.local_shed),
        ("/sink/", sink_views.local_sink),
        ("/rates/{id}/", lambda: views.project_rates("inv-99999", 60)),
        ("/metrics", lambda: generate_latest(metrics.registry)),
    ):
        median, worst, result = _timed(fn, meter, runtime)
        timings[name] = (median, worst)
        if name == "/rates/":
            rates = result
        elif name == "/shed/":
            shed = result
        elif name == "/sink/":
            sink = result
        elif name == "/metrics":
            text = result
        else:
            status, project = result
    print(
        f"\n{N_PROJECTS + 1} projects, median/max of 5 requests: "
        + ", ".join(f"{name} {m * 1000:.1f}/{w * 1000:.1f} ms" for name, (m, w) in timings.items())
        + f"; the tick's refresh (every second, in slices): {statistics.median(REFRESHES) * 1000:.0f} ms"
    )
    for name, (median, _) in timings.items():
        assert median < VIEW_BUDGET_SECONDS, f"{name} took {median * 1000:.0f} ms (median)"
    assert rates["projects"][0]["project_id"] == "hot" and len(rates["projects"]) == 20
    assert [s["project_id"] for s in shed["shed"]] == ["inv-7"]
    assert sink["events_in"] == N_PROJECTS + 500
    assert status == 200 and project["counters"]["received"] == 1 and project["counters"]["admitted"] == 1
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    received = {s.labels["project"]: s.value for s in families["streamapp_project_events_received"].samples}
    assert len(received) <= 21 and OTHER in received
    exact = families["streamapp_all_projects_events_received"].samples[0].value
    assert exact == N_PROJECTS + 500 == sum(received.values())
    meter.projects["inv-7"].state = type(meter.projects["inv-7"].state)("inv-7")
    meter._watch(meter.projects["inv-7"])


def test_the_ticks_pass_over_100000_projects_lets_the_loop_in_between_slices(
    many_projects: tuple[Meter, FakeRuntime, float],
) -> None:
    """The read model's refresh shares the loop with the agents and every HTTP request: it must
    yield between slices of READ_MODEL_SLICE projects, and select what one unbroken pass selects."""
    meter, _, _ = many_projects
    now = time.time()
    stretches: list[float] = []

    async def refresh_beside_a_probe() -> None:
        refresh = asyncio.ensure_future(meter.refresh_read_model(now))
        last = time.perf_counter()
        while not refresh.done():
            await asyncio.sleep(0)  # runs again only when the refresh yields (or ends)
            stretches.append(time.perf_counter() - last)
            last = time.perf_counter()
        await refresh

    asyncio.run(refresh_beside_a_probe())
    print(
        f"\nthe tick's pass over {len(meter.projects)} projects: {len(stretches)} slices, "
        f"longest {max(stretches) * 1000:.0f} ms, all {sum(stretches) * 1000:.0f} ms"
    )
    assert len(stretches) >= len(meter.projects) // READ_MODEL_SLICE
    assert meter._top_cache is not None
    assert meter._top_cache[2] == meter._select_top(TOP_SELECTION_LIMIT, now)
    assert meter._top_cache[2][0] == "hot"


def test_100000_projects_are_forgotten_when_idle_and_totals_stay_exact(
    many_projects: tuple[Meter, FakeRuntime, float],
) -> None:
    meter, runtime, now = many_projects
    assert flush_everything(runtime, now + 60) >= N_PROJECTS
    assert meter.evict_idle(now + 10) == 0  # not idle for the ring's length yet
    passes: list[float] = []
    forgotten = 0
    while meter.projects or any(w.counts for w in runtime.sink.partitions.values()):
        started = time.perf_counter()
        forgotten += meter.evict_idle(now + meter.idle_seconds + 2)
        passes.append(time.perf_counter() - started)
        assert len(passes) <= 2 * N_PROJECTS // EVICT_BATCH
    print(f"\nforgetting {forgotten} idle projects: {len(passes)} passes, longest {max(passes) * 1000:.0f} ms")
    assert forgotten == N_PROJECTS + 1
    assert not meter.projects and not meter.by_key
    assert all(not w.counts for w in runtime.sink.partitions.values())
    totals = meter.counter_totals()
    assert totals["received"] == totals["admitted"] == N_PROJECTS + 500


@pytest.mark.parametrize("seed", range(3))
def test_top_equals_ranking_every_project_exactly(seed: int) -> None:
    """The bound-and-prune ranking gives what sorting every project by its exact rate gives."""
    import random

    rng = random.Random(seed)
    meter, runtime = new_meter("export")
    now = time.time()
    records: dict[int, list[Rec]] = {p: [] for p in range(PARTITIONS)}
    for i in range(3000):
        project = f"p{rng.randrange(800)}"
        p = i % PARTITIONS
        ts = int((now - rng.choice([0, 0, 1, 3, 8, 15, 70])) * 1000)
        records[p].append(Rec(project.encode(), b"{}", len(records[p]), p, ts))
    feed(meter, runtime, records)
    got = meter.top(25)
    now = time.time()
    now_sec = int(now)
    elapsed = now - now_sec
    expected = sorted(
        meter.projects,
        key=lambda p: (-round(meter.projects[p].counts.rate(now_sec, meter.burst_h, elapsed)[0], 1), p),
    )
    assert [r["project_id"] for r in got] == expected[:25]
    # The tick's pass, in slices (small ones here, so that there are many), selects the same.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(read_model, "READ_MODEL_SLICE", 97)
        asyncio.run(meter.refresh_read_model(now))
    assert meter._top_cache is not None and meter._top_cache[2] == expected[:TOP_SELECTION_LIMIT]


# ------------------------------------------------------------------------------ unknown ids


def test_shared_policy_meters_unknown_projects_as_one_per_partition() -> None:
    meter, runtime = new_meter("shared")
    runtime.control.view.projects["honest"] = ProjectSettings("honest")
    now_ms = int(time.time() * 1000)
    records = one_event_records(2000, now_ms)
    records[0].append(Rec(b"honest", b'{"project_id":"honest","collection":"c","event":{}}', 10_000, 0, now_ms))
    feed(meter, runtime, records)
    assert set(meter.projects) == {"honest", *(shared_meter_id(p) for p in range(PARTITIONS))}
    assert meter.projects[shared_meter_id(0)].received == 500
    assert meter.received_total == 2001


def test_shared_route_applies_to_unknown_projects_only_and_dead_letter_exports_nothing() -> None:
    meter, runtime = new_meter("shared")
    runtime.control.view.projects["honest"] = ProjectSettings("honest")
    windows = runtime.sink.partitions[0]
    windows.marker(0, shared_meter_id(0), Route("drop", 0.0))  # the shared meter is shed: drop all
    value = b'{"project_id":"%s","collection":"c","event":{}}'
    windows.process(1, int(time.time() * 1000), b"bug-1", value % b"bug-1")
    windows.process(2, int(time.time() * 1000), b"honest", value % b"honest")
    assert windows.counts["bug-1"].dropped == 1 and windows.counts["honest"].admitted == 1

    meter, runtime = new_meter("dead-letter")
    runtime.control.view.projects["honest"] = ProjectSettings("honest")
    windows = runtime.sink.partitions[0]
    windows.process(0, int(time.time() * 1000), b"bug-1", value % b"bug-1")
    windows.process(1, int(time.time() * 1000), b"honest", value % b"honest")
    assert [(i.offset, i.reason) for i in windows.invalid] == [(0, "unknown project 'bug-1': not created")]
    assert "bug-1" not in windows.counts and windows.counts["honest"].admitted == 1


# ---------------------------------------------------------------------------------- uploads


def test_fair_queue_starts_a_created_projects_object_within_one_round() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(50_000):
        queue.push(UNKNOWN_FLOW, f"bug-{i}")
    queue.push("honest", "honest-object")
    queue.push("", "manifest-part")
    order = [queue.pop() for _ in range(5)]
    assert order[:3] == ["bug-0", "honest-object", "manifest-part"]
    assert order[3:] == ["bug-1", "bug-2"]
    assert len(queue) == 50_000 - 3 and queue.flows() == 1


# ------------------------------------------------------------------------------ rings


_ADDS = st.lists(
    st.tuples(st.integers(0, 200), st.integers(0, 5), st.integers(0, 50)),
    max_size=40,
)


@given(adds=_ADDS, ahead=st.integers(0, 25), horizon=st.integers(1, 10), elapsed=st.floats(0, 1))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_inline_ring_behaves_like_the_list_ring(
    adds: list[tuple[int, int, int]], ahead: int, horizon: int, elapsed: float
) -> None:
    """The one-second inline form is an allocation detail: every answer equals the list form's
    (asked at or after the newest second added, as the meter does: it never counts the future)."""
    now = max((second for second, _, _ in adds), default=0) + ahead
    inline, lists = SecondCounts(10), SecondCounts(10)
    lists._materialize()
    for second, events, nbytes in adds:
        assert inline.add(second, events, nbytes) == lists.add(second, events, nbytes)
    assert inline.rate(now, horizon, elapsed) == lists.rate(now, horizon, elapsed)
    assert inline.rate(now, horizon, elapsed, full_window=True) == lists.rate(now, horizon, elapsed, full_window=True)
    assert inline.series(now, 10) == lists.series(now, 10)
    assert inline.to_dict() == lists.to_dict()
    assert SecondCounts.from_dict(inline.to_dict()).to_dict() == inline.to_dict()
    assert (inline.last_second, inline.run_start) == (lists.last_second, lists.run_start)
    assert inline.rate_bound(now, horizon, elapsed) >= inline.rate(now, horizon, elapsed)[0]


def test_metrics_from_totals_stay_monotonic_and_exact_for_new_projects() -> None:
    """``update_totals`` (O(labels)): what ``update`` guarantees, without every project's counters."""
    from streamapp.metering import BoundedProjectCounters

    def counts(received: int) -> dict[str, int]:
        return {"received": received, "admitted": received, "diverted": 0, "dropped": 0, "bytes": 10 * received}

    c = BoundedProjectCounters(top_n=1)
    c.update_totals(counts(100), {"a": counts(60), "b": counts(30)}, ["a"])
    assert c.totals["a"][0] == 60 and c.totals[OTHER][0] == 40  # new: its whole count is its own
    c.update_totals(counts(150), {"a": counts(80), "b": counts(50)}, ["b", "a"])
    assert "a" not in c.totals  # dropped out of the top: its series goes (bounded labels)
    assert c.totals["b"][0] == 20  # near the top before: only its increase; its 30 stayed in other
    assert c.totals[OTHER][0] == 40 + (50 - 20)  # a's increase and the rest
    assert c.all_projects[0] == 150
    c.update_totals(counts(120), {"b": counts(55)}, ["b"])  # a partition revoked: a new baseline
    assert c.totals[OTHER][0] == 70 and c.all_projects[0] == 150 and c.totals["b"][0] == 25
    c.update_totals(counts(130), {"b": counts(60)}, ["b"])
    assert c.totals[OTHER][0] == 75 and c.all_projects[0] == 160
