"""The read views, /metrics, /readyz and `streamapp status` against real workers (Tansu + moto).

Every number is checked against what the test produced: rates against the generated rate,
the shed list against the spiking project, the sink backlog against a drained stream, the
metrics' totals against the count of events sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import statistics
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from streamapp.cli import main as cli_main
from streamapp.dev import produce_load
from streamapp.metering.views import merge_top, rate_from_series
from streamapp.partitioning import key_partition
from streamapp.sink.views import merge_sink
from streamapp.web.auth import read_allowed
from tests.helpers import wait_until

READ_TOKEN = "read-s3cret"
ADMIN_TOKEN = "admin-s3cret"
FAST = {
    "window_seconds": 4,
    "allowed_lateness_seconds": 1,
    "idle_flush_seconds": 1,
}


# ------------------------------------------------------------------------------------ helpers
def get(url: str, token: str | None = READ_TOKEN, timeout: float = 5.0) -> tuple[int, Any]:
    """(status, decoded JSON or text) of a GET."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body, ctype = response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, body, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    if "json" in ctype:
        return status, json.loads(body)
    return status, body.decode()


def get_ok(url: str, token: str | None = READ_TOKEN) -> Any:
    status, body = get(url, token)
    assert status == 200, f"GET {url}: {status} {body}"
    return body


class Producer(threading.Thread):
    """produce_load in the background; ``sent`` is filled in when it is done."""

    def __init__(self, bootstrap: str, topic: str, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.args = (bootstrap, topic)
        self.kwargs = kwargs
        self.sent: dict[str, int] | None = None
        self.error: BaseException | None = None
        self.stop_now = False

    def run(self) -> None:
        try:
            self.sent = asyncio.run(produce_load(*self.args, should_stop=lambda: self.stop_now, **self.kwargs))
        except BaseException as exc:  # noqa: BLE001 - re-raised in result()
            self.error = exc

    def result(self, timeout: float = 60) -> dict[str, int]:
        self.join(timeout)
        if self.error is not None:
            raise self.error
        assert self.sent is not None, "producer did not finish"
        return self.sent


async def _one_event_each(bootstrap: str, topic: str, projects: list[str]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all")
    await producer.start()
    try:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"
        futures = [
            await producer.send(
                topic,
                orjson.dumps({"project_id": p, "collection": "c", "event": {"n": 0, "keen": {"timestamp": stamp}}}),
                key=p.encode(),
            )
            for p in projects
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def scrape(web: str) -> dict[str, Any]:
    text = get_ok(f"{web}/metrics")
    assert isinstance(text, str)
    return {family.name: family for family in text_string_to_metric_families(text)}


def metered_from(families: dict[str, Any], want: int) -> dict[str, Any] | None:
    """The scrape if its exact all-projects total is ``want`` and nothing is unread, else None."""
    # An idle partition's watermark tick can be unread for a moment: take a scrape without one.
    unread = sum(s.value for s in families["streamapp_consumer_lag"].samples)
    return families if all_received(families) == want and unread == 0 else None


def all_received(families: dict[str, Any]) -> float:
    return float(families["streamapp_all_projects_events_received"].samples[0].value)


def received_series(families: dict[str, Any]) -> dict[str, float]:
    """project label -> value of the per-project received counter."""
    return {
        s.labels["project"]: s.value
        for s in families["streamapp_project_events_received"].samples
        if s.name.endswith("_total")
    }


def within(value: float, expected: float, tolerance: float = 0.10) -> bool:
    return abs(value - expected) <= tolerance * expected


# ------------------------------------------------------------------------ single worker, all views
def test_views_against_produced_traffic(broker, worker_env, start_worker) -> None:
    env = worker_env(
        **FAST,
        default_eps_limit=300,
        read_token=READ_TOKEN,
        admin_token=ADMIN_TOKEN,
        shed_cooldown_seconds=60,
    )
    worker = start_worker(env)
    web = worker.web_url
    topic = env["STREAMAPP_EVENTS_TOPIC"]
    wait_until(lambda: get(f"{web}/readyz", token=None)[0] == 200, 45, what="/readyz 200 before any traffic")
    normal = [f"steady-{i}" for i in range(4)]
    # 4 projects at 100 ev/s and one at 1000 ev/s (spike factor 10 from the start) against a 300 ev/s quota.
    load = Producer(
        broker.bootstrap, topic, rate=500, projects=[*normal, "hot"], duration=14, spikes=[("hot", 10.0, 0, 14)]
    )
    load.start()
    try:
        # --- security: read token, /healthz open, Faust's table dumps gone
        status, body = get(f"{web}/rates/", token=None)
        assert status == 401 and "unauthorized" in body["error"]
        assert get(f"{web}/rates/", token="wrong")[0] == 401
        assert get(f"{web}/metrics", token=None)[0] == 401
        assert get(f"{web}/sink/", token=None)[0] == 401
        assert get(f"{web}/shed/", token=None)[0] == 401
        assert get(f"{web}/rates/?token={READ_TOKEN}", token=None)[0] == 400  # no tokens in URLs (#10)
        assert get(f"{web}/rates/", token=ADMIN_TOKEN)[0] == 401  # the admin token is no read token (#10)
        assert get(f"{web}/healthz", token=None) == (200, {"status": "ok", "worker": web})
        for path in ("/table/", "/table/meter-rates/", "/table/meter-rates/hot/", "/table/meter-shed/"):
            assert get(f"{web}{path}", token=ADMIN_TOKEN)[0] == 404, path
        assert get(f"{web}/rates/?limit=0")[0] == 400
        assert get(f"{web}/rates/not%20a%20project/")[0] == 400

        # --- /rates/: every project within 10 % of its generated rate
        def rates_match() -> dict[str, Any] | None:
            body = get_ok(f"{web}/rates/?limit=10")
            by_id = {p["project_id"]: p for p in body["projects"]}
            if set(by_id) < {*normal, "hot"}:
                return None
            ok = all(within(by_id[p]["eps_burst"], 100) for p in normal) and within(by_id["hot"]["eps_burst"], 1000)
            return body if ok else None

        time.sleep(4)
        rates = wait_until(rates_match, 10, interval=0.5, what="rates within 10% of the generated rates")
        top = rates["projects"]
        assert top[0]["project_id"] == "hot", "sorted by current rate"
        hot = top[0]
        assert hot["quota_eps"] == 300
        assert hot["state"] == "shed" and hot["mode"] == "divert"
        assert hot["bps_burst"] > 0 and hot["counters"]["received"] > 0
        assert rates["workers"] == {web: "ok"} and rates["partial"] is False
        assert "event" not in json.dumps(rates).replace("events", ""), "no event payloads in views"
        assert len(get_ok(f"{web}/rates/?limit=2")["projects"]) == 2

        # --- /rates/{project}/: the per-second series matches the generated rate
        # Only whole seconds count: after the first second with traffic (the load may start late on a
        # busy machine) and before the current, still-filling second.
        def full_seconds() -> tuple[dict[str, Any], list[int]] | None:
            series = get_ok(f"{web}/rates/steady-1/?seconds=30")
            now = int(time.time())
            busy = [p for p in series["series"] if p["events"] > 0]
            if not busy:
                return None
            first = min(p["second"] for p in busy)
            full = [p["events"] for p in series["series"] if first < p["second"] < now - 1]
            return (series, full) if len(full) >= 5 else None

        series, full = wait_until(full_seconds, 8, interval=0.5, what="5 whole seconds of steady-1's series")
        assert series["project_id"] == "steady-1" and series["worker"] == web
        assert within(statistics.median(full), 100), full
        assert within(series["rate"]["eps_burst"], 100, 0.2)
        assert get(f"{web}/rates/never-seen/")[0] == 404

        # --- /shed/: the spiking project, with its rate and limit; nobody else
        shed = get_ok(f"{web}/shed/")
        assert [s["project_id"] for s in shed["shed"]] == ["hot"]
        entry = shed["shed"][0]
        assert entry["state"] == "shed" and entry["mode"] == "divert"
        assert entry["limit"] == 300 and entry["rate"] > 450
        assert entry["since"] <= time.time() and entry["reason"]
        assert any(e["project_id"] == "hot" and e["end"] is None for e in shed["episodes"])

        # --- /readyz: thresholds are applied (an open window is older than 0 s while traffic flows)
        status, ready = get(f"{web}/readyz?max_age=0", token=None)
        assert status == 503 and any("unflushed" in r for r in ready["reasons"]), ready
        assert ready["assigned_partitions"] == [0, 1, 2, 3]

        # --- /metrics while traffic flows: the hot project has its own series, shed gauge set
        families = scrape(web)
        shed_gauge = {s.labels["project"]: s.value for s in families["streamapp_project_shed"].samples}
        assert shed_gauge["hot"] == 1 and all(v == 0 for p, v in shed_gauge.items() if p != "hot")
    except BaseException:
        load.stop_now = True
        raise
    finally:
        sent = load.result()

    total = sum(sent.values())
    assert within(sent["hot"], 14_000, 0.05) and all(within(sent[p], 1400, 0.05) for p in normal)

    # --- /sink/: the backlog falls to 0 once the stream is drained
    def drained() -> dict[str, Any] | None:
        sink = get_ok(f"{web}/sink/")
        parts = sink["partitions"]
        done = bool(parts) and all(
            p["offsets_behind"] == 0 and p["oldest_unflushed_age_seconds"] == 0 for p in parts.values()
        )
        return sink if done and sink["objects_written"] > 0 else None

    sink = wait_until(drained, 40, interval=0.5, what="sink backlog back to 0")
    assert sink["offsets_behind"] == 0 and sink["read_lag"] == 0 and sink["open_windows"] == 0
    # Every event read once by the sink, the hot project's admitted and diverted ones alike.
    assert sink["events_in"] == total, (sink["events_in"], total)
    assert sink["s3_errors"] == 0 and sink["last_flush_at"] > 0 and sink["bytes_written"] > 0
    assert isinstance(sink["overflow"], dict)
    status, ready = get(f"{web}/readyz", token=None)
    assert status == 200 and ready["status"] == "ready", ready

    # --- /metrics: exact totals against what was produced, latency histograms
    def metered(want: int) -> dict[str, Any] | None:
        return metered_from(scrape(web), want)

    families = wait_until(lambda: metered(total), 20, what="metered total == produced, nothing unread")
    received = {s.labels["project"]: s.value for s in families["streamapp_project_events_received"].samples}
    assert received["hot"] == sent["hot"]
    assert sum(received.values()) == total
    diverted = {s.labels["project"]: s.value for s in families["streamapp_project_events_diverted"].samples}
    assert diverted["hot"] > 0
    lag = {s.labels["partition"]: s.value for s in families["streamapp_consumer_lag"].samples}
    assert lag and set(lag) <= {"0", "1", "2", "3"} and all(v == 0 for v in lag.values()), lag
    assert all(s.value == 0 for s in families["streamapp_oldest_unflushed_age_seconds"].samples)
    put_count = [s for s in families["streamapp_s3_put_seconds"].samples if s.name.endswith("_count")]
    assert put_count[0].value > 0
    http = {
        (s.labels["route"], s.labels["status"])
        for s in families["streamapp_http_request_seconds"].samples
        if s.name.endswith("_count")
    }
    assert ("/rates/", "200") in http and ("/rates/", "401") in http and ("/rates/{project_id}/", "200") in http

    # --- `streamapp status` prints the same picture
    def status_text() -> str | None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli_main(["status", "--web", web, "--token", READ_TOKEN]) == 0
        text = out.getvalue()
        return text if "lag 0 unread" in text else None  # (an idle tick may be unread for a moment)

    text = wait_until(status_text, 10, what="status with nothing unread")
    assert "TOP PROJECTS" in text and "SHED (1)" in text
    hot_line = next(line for line in text.splitlines() if " hot " in line and "SHED" in line)
    assert "divert" in hot_line
    lag_line = re.search(r"lag 0 unread, (\d+) uncommitted offsets", text)
    # Idle partitions get a watermark tick every idle_flush_seconds and one as a window may close
    # (sink.service.tick_idle_partitions): two per partition may be uncommitted (one partition had
    # two in a CI run with a CPU burner beside it), nothing else.
    assert lag_line and int(lag_line.group(1)) <= 8, text
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["status", "--web", web, "--token", "nope"]) == 1

    # --- 10,000 distinct projects: the label count stays bounded, the totals stay exact
    # Label bookkeeping is exact: between two scrapes the labelled series grow by exactly the events
    # received meanwhile, less the history of the series dropped from the top (by design, it leaves
    # with its label; the unlabelled all-projects counter keeps it).
    scrapes = [scrape(web)]

    def metered_tracked(want: int) -> dict[str, Any] | None:
        scrapes.append(scrape(web))
        return metered_from(scrapes[-1], want)

    many = [f"tenant-{i}" for i in range(10_000)]
    asyncio.run(_one_event_each(broker.bootstrap, topic, many))
    families = wait_until(lambda: metered_tracked(total + len(many)), 30, what="10,000 more projects metered")
    for before, after in zip(scrapes, scrapes[1:], strict=False):
        old_series, new_series = received_series(before), received_series(after)
        left = sum(v for label, v in old_series.items() if label not in new_series)
        grown = all_received(after) - all_received(before)
        assert sum(new_series.values()) == sum(old_series.values()) + grown - left, (old_series, new_series)
        assert new_series.get("other", 0) >= old_series.get("other", 0)
        for label, value in new_series.items():
            assert value >= old_series.get(label, 0) or label not in old_series
    labels = set()
    series_count = 0
    for family in families.values():
        for sample in family.samples:
            if "project" in sample.labels:
                labels.add(sample.labels["project"])
                series_count += 1
    assert len(labels) <= 21, len(labels)  # top 20 + "other"
    assert series_count < 200
    assert all_received(families) == total + len(many)
    assert received_series(families).get("other", 0) > 0, "tenants outside the top are counted in other"


# ----------------------------------------------------------------------- two workers: routing/merge
def test_two_workers_route_and_merge(broker, worker_env, start_worker) -> None:
    first = start_worker(worker_env(**FAST))
    second = start_worker(worker_env(**FAST))
    webs = [first.web_url, second.web_url]

    def split() -> dict[str, list[int]] | None:
        owned = {}
        for web in webs:
            _, body = get(f"{web}/readyz", token=None)
            owned[web] = body.get("assigned_partitions", [])
        parts = sorted(p for ps in owned.values() for p in ps)
        return owned if parts == [0, 1, 2, 3] and all(owned.values()) else None

    wait_until(split, 45, what="both workers assigned, partitions split between them")
    topic = worker_env()["STREAMAPP_EVENTS_TOPIC"]
    projects = [f"proj-{i}" for i in range(8)]
    load = Producer(broker.bootstrap, topic, rate=400, projects=projects, duration=9)  # 50 ev/s each
    load.start()
    try:
        time.sleep(5)
        local = {web: {p["project_id"] for p in get_ok(f"{web}/rates/?local=1&limit=50")["projects"]} for web in webs}
        assert local[webs[0]] and local[webs[1]], f"each worker meters some projects: {local}"
        assert not local[webs[0]] & local[webs[1]], "a project is metered by one worker only"
        assert local[webs[0]] | local[webs[1]] == set(projects)
        for project in projects:
            owner = next(web for web in webs if project in local[web])
            for web in webs:
                body = get_ok(f"{web}/rates/{project}/?seconds=10")
                assert body["worker"] == owner, (project, web, body)
                assert body["project_id"] == project and body["series"]
                if web != owner:
                    assert body["routed_from"] == web

        def merged_rates() -> dict[str, Any] | None:
            body = get_ok(f"{webs[0]}/rates/?limit=50")
            by_id = {p["project_id"]: p for p in body["projects"]}
            ok = set(by_id) == set(projects) and all(within(p["eps_burst"], 50) for p in by_id.values())
            return body if ok else None

        merged = wait_until(merged_rates, 8, what="merged /rates/ with every project within 10%")
        assert merged["workers"] == {webs[0]: "ok", webs[1]: "ok"} and not merged["partial"]
        assert {p["worker"] for p in merged["projects"]} == set(webs)
        sink = get_ok(f"{webs[1]}/sink/")
        assert sorted(sink["partitions"]) == ["0", "1", "2", "3"] and set(sink["workers"]) == set(webs)
        assert get_ok(f"{webs[1]}/shed/")["workers"] == {webs[1]: "ok", webs[0]: "ok"}
    except BaseException:
        load.stop_now = True
        raise
    finally:
        load.result()


# -------------------------------------------------------------------------------- pure helpers
def test_merge_helpers() -> None:
    a = [{"project_id": "x", "eps_burst": 5.0, "counters": {"received": 10}}]
    b = [
        {"project_id": "y", "eps_burst": 9.0, "counters": {"received": 3}},
        {"project_id": "x", "eps_burst": 1.0, "counters": {"received": 2}},  # stale copy during a rebalance
    ]
    assert [(p["project_id"], p["eps_burst"]) for p in merge_top([a, b], 10)] == [("y", 9.0), ("x", 5.0)]
    assert len(merge_top([a, b], 1)) == 1
    merged = merge_sink(
        [
            {
                "partitions": {"0": {"committed_offset": 5}},
                "objects_written": 2,
                "last_flush_at": 10.0,
                "last_error": "",
            },
            {
                "partitions": {"1": {"committed_offset": 7}},
                "objects_written": 3,
                "last_flush_at": 20.0,
                "last_error": "x",
            },
        ]
    )
    assert merged["objects_written"] == 5 and merged["last_flush_at"] == 20.0 and merged["last_error"] == "x"
    assert sorted(merged["partitions"]) == ["0", "1"]
    series = [{"second": 7, "events": 10, "bytes": 100}, {"second": 8, "events": 30, "bytes": 0}]
    assert rate_from_series(series, 10, 3) == {"eps": 40 / 3, "bps": 100 / 3}
    assert rate_from_series(series, 10, 10) == {"eps": 40 / 3, "bps": 100 / 3}  # since the first data
    assert rate_from_series(series, 10, 2) == {"eps": 15.0, "bps": 0.0}
    assert rate_from_series([], 10, 2) == {"eps": 0.0, "bps": 0.0}


def test_key_partition_is_the_producers_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    for i in range(200):
        key = f"project-{i}"
        assert key_partition(key, 4) == DefaultPartitioner()(key.encode(), [0, 1, 2, 3], [0, 1, 2, 3])


class _Req:
    def __init__(self, headers: dict[str, str], query: dict[str, str]) -> None:
        self.headers = headers
        self.query = query


@pytest.mark.parametrize(
    ("headers", "query", "allowed"),
    [
        ({}, {}, False),
        ({"Authorization": "Bearer r"}, {}, True),
        ({"Authorization": "bearer a"}, {}, True),  # "a": the peer token here (#10)
        ({"Authorization": "Bearer x"}, {}, False),
        ({}, {"token": "r"}, False),  # never from the URL (#10)
        ({"Authorization": "Basic r"}, {}, False),
    ],
)
def test_read_token(headers: dict[str, str], query: dict[str, str], allowed: bool) -> None:
    assert read_allowed(_Req(headers, query), "r", "a") is allowed
    assert read_allowed(_Req(headers, query), "", "a") is True  # no read token: open
