"""Metering and shedding end to end: real Tansu broker, real moto S3, real worker processes.

Scenario of the issue: 20 projects at a steady 20 ev/s under a 40 ev/s quota; one of them
jumps to 20x its quota (800 ev/s). Horizons are shortened so the test runs in seconds
(burst 5 s, sustained 6 s, cooldown 5 s); the logic is the same at the defaults.
"""

from __future__ import annotations

import asyncio
import calendar
import gzip
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from streamapp.control import publish_records, quota_record
from streamapp.dev import PROJECT_ROOT, WorkerProcess, produce_load
from streamapp.metering.decisions import SHAPING_HORIZON_SECONDS
from tests.api_helpers import topic_entries

pytestmark = pytest.mark.integration

QUOTA = 40.0
STEADY = 20.0  # ev/s per project
COOLDOWN = 5.0
PROJECTS = [f"p{i:02d}" for i in range(20)]
METER_ENV = {
    "window_seconds": 2,
    "allowed_lateness_seconds": 1,
    "idle_flush_seconds": 1,
    "shed_cooldown_seconds": COOLDOWN,
    "default_eps_limit": QUOTA,
    "burst_horizon_seconds": 5,
    "sustained_horizon_seconds": 6,
}


# ------------------------------------------------------------------ helpers
def meter(worker: WorkerProcess, project: str | None = None) -> dict[str, Any]:
    url = f"{worker.web_url}/_meter/" + (f"?project={project}" if project else "")
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:  # worker web server not answering (yet)
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def wait_metering(workers: list[WorkerProcess], partitions: int = 4, timeout: float = 90.0) -> None:
    """Until the workers' meters own all partitions between them (group joined, tables recovered)."""

    def owned() -> bool:
        states = [meter(w) for w in workers]
        got = sorted(p for s in states if s["ready"] for p in s["partitions"])
        return got == list(range(partitions))

    wait_until(owned, timeout, "meters owning every partition")


class Producer:
    """produce_load in a thread (the test polls meanwhile); ``stop()`` ends it early."""

    def __init__(self, bootstrap: str, topic: str, **kwargs: Any) -> None:
        self.stopped = False
        self.sent: dict[str, int] = {}
        self.started_at = 0.0
        self._thread = threading.Thread(target=self._run, args=(bootstrap, topic, kwargs), daemon=True)

    def _run(self, bootstrap: str, topic: str, kwargs: dict[str, Any]) -> None:
        self.sent = asyncio.run(produce_load(bootstrap, topic, should_stop=self._should_stop, **kwargs))

    def _should_stop(self) -> bool:
        # produce_load asks first right where its clock starts (after the producer connected):
        # spike times are offsets from this moment, not from the thread's start.
        if not self.started_at:
            self.started_at = time.time()
        return self.stopped

    def start(self) -> Producer:
        self._thread.start()
        while not self.started_at:
            time.sleep(0.01)
        return self

    def stop(self) -> dict[str, int]:
        self.stopped = True
        return self.join()

    def join(self) -> dict[str, int]:
        self._thread.join(timeout=120)
        assert not self._thread.is_alive()
        return self.sent


def control_records(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every record on the control topic so far, oldest first (to its end at the call:
    ``api_helpers.topic_entries``, which also reads the rest of a last batch of several records)."""
    return [orjson.loads(value) for _, value in topic_entries(bootstrap, topic)]


def shed_states(records: list[dict[str, Any]], project: str | None = None) -> list[dict[str, Any]]:
    return [
        r["state"]
        for r in records
        if r.get("type") == "shed_state" and (project is None or r.get("project_id") == project)
    ]


def exported(s3_client: Any, bucket: str) -> dict[str, list[dict[str, Any]]]:
    """Every event object in the bucket: key -> events."""
    out = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="events/"):
        for item in page.get("Contents", []):
            key = item["Key"]
            if key.endswith(".json.gz") and "/_" not in key:
                body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
                out[key] = [orjson.loads(line) for line in gzip.decompress(body).splitlines()]
    return out


def event_counts(objects: dict[str, list[dict[str, Any]]], delayed: bool | None = None) -> Counter[tuple[str, int]]:
    seen: Counter[tuple[str, int]] = Counter()
    for key, events in objects.items():
        if delayed is not None and key.endswith("-delayed.json.gz") != delayed:
            continue
        project = key.split("/")[1]
        for event in events:
            seen[(project, event["n"])] += 1
    return seen


def expected(sent: dict[str, int]) -> Counter[tuple[str, int]]:
    return Counter({(p, n): 1 for p, count in sent.items() for n in range(count)})


def wait_exported(
    s3_client: Any, bucket: str, want: Counter[tuple[str, int]], timeout: float = 60.0, worker: Any = None
) -> None:
    total = sum(want.values())
    try:
        wait_until(
            lambda: sum(event_counts(exported(s3_client, bucket)).values()) >= total,
            timeout,
            f"{total} events in S3",
            interval=1.0,
        )
    except AssertionError as exc:
        got = event_counts(exported(s3_client, bucket))
        missing = Counter(project for project, _ in (want - got))
        extra = Counter(project for project, _ in (got - want))
        status = meter(worker) if worker is not None else {}
        lost = sorted(want - got)
        raise AssertionError(
            f"{exc}\nmissing per project: {dict(missing)}\nextra: {dict(extra)}\n"
            f"first/last missing: {lost[:3]} … {lost[-3:]}\n"
            f"drain: {status.get('drain')}\ncounters p00: {status.get('counters', {}).get('p00')}"
        ) from None
    time.sleep(2.0)  # anything written twice would show up now


def per_second(events: list[dict[str, Any]]) -> Counter[int]:
    """Events per second of their keen.timestamp (the producer stamps the send second)."""
    out: Counter[int] = Counter()
    for event in events:
        out[calendar.timegm(time.strptime(event["keen"]["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))] += 1
    return out


# -------------------------------------------------------------------- tests
def test_spike_is_shaped_diverted_and_drained_exactly_once(broker, s3_client, bucket, worker_env, start_worker):
    env = worker_env(**METER_ENV)
    worker = start_worker(env)
    wait_metering([worker])
    topic = env["STREAMAPP_EVENTS_TOPIC"]
    # 20x its quota (800 ev/s), long enough for seconds of shaping at the settled fraction (below).
    spike_at, spike_len, factor = 6.0, 9.0, 20 * QUOTA / STEADY
    producer = Producer(
        broker.bootstrap,
        topic,
        rate=STEADY * len(PROJECTS),
        projects=PROJECTS,
        duration=spike_at + spike_len + 6 + COOLDOWN + 4,
        spikes=[("p00", factor, spike_at, spike_len)],
    ).start()
    jump = producer.started_at + spike_at
    spike_end = jump + spike_len

    # Shed while the spike runs: the real-time path keeps getting the quota.
    status = wait_until(
        lambda: next((s for s in meter(worker)["shed"]["shed"] if s["project_id"] == "p00"), None),
        spike_at + 4,
        "p00 shed",
    )
    assert status["mode"] == "divert" and status["state"] == "shed"
    sent = producer.join()
    assert sent["p00"] > 3000 and all(1e2 < sent[p] < 1e3 for p in PROJECTS[1:])

    want = expected(sent)
    wait_exported(s3_client, bucket, want, worker=worker)
    objects = exported(s3_client, bucket)
    # Every event of every project in S3 exactly once (real-time + delayed).
    assert event_counts(objects) == want
    delayed = {k: v for k, v in objects.items() if k.endswith("-delayed.json.gz")}
    assert delayed and {k.split("/")[1] for k in delayed} == {"p00"}, "only the spiking project's excess is delayed"

    # Shed within 2 s of the jump (the first over-quota second), and only p00, ever.
    records = control_records(broker.bootstrap, f"{topic}-control")
    states = shed_states(records)
    assert {s["project_id"] for s in states if s["state"] == "shed"} == {"p00"}
    p00 = shed_states(records, "p00")
    shed = next(s for s in p00 if s["state"] == "shed")
    assert shed["episode"] == 1
    assert shed["since"] - jump <= 2.0, f"shed {shed['since'] - jump:.2f}s after the jump"
    assert shed["limit_eps"] == QUOTA and "rate" in shed["reason"]  # burst or sustained rule
    # Back to ok only after the cooldown: at least COOLDOWN after the spike ended, and once.
    ok = [s for s in p00 if s["state"] == "ok" and s["episode"] == 1]
    assert len(ok) == 1 and ok[0]["since"] - spike_end >= COOLDOWN
    assert not [s for s in p00 if s["episode"] > 1]

    # Shaping, not blackout: during the spike the real-time path got about the quota every second.
    # The admitted fraction is sized on the rate of the last SHAPING_HORIZON_SECONDS: until that
    # horizon holds only spike seconds it still counts the quieter ones before, so the first
    # seconds may admit more (a shed marker moves only on a > FRACTION_CHANGE change); from then
    # on, about the quota.
    realtime = [e for k, events in objects.items() if "/p00/" in k and k not in delayed for e in events]
    during = per_second(realtime)
    seconds = range(int(shed["since"]) + 2, int(spike_end))
    settled = range(int(shed["since"]) + SHAPING_HORIZON_SECONDS + 1, int(spike_end))
    assert len(settled) >= 2
    print("p00 real-time events per second of the spike:", {s: during[s] for s in seconds})
    for second in seconds:
        assert during[second] >= 0.4 * QUOTA, (second, during[second])
    for second in settled:
        assert during[second] <= 2.0 * QUOTA, (second, during[second])
    late_delayed = sum(len(events) for events in delayed.values())
    assert late_delayed + len(realtime) == sent["p00"] and late_delayed > 0.6 * (sent["p00"] - 20 * STEADY)

    # Counters: what the sink admitted/diverted adds up; the drain wrote delayed objects.
    state = meter(worker)
    counters = state["counters"]["p00"]
    assert counters["received"] == sent["p00"]
    assert counters["admitted"] + counters["diverted"] == sent["p00"]
    assert counters["diverted"] == late_delayed and counters["dropped"] == 0
    assert counters["bytes"] > 0
    assert state["drain"]["delayed_objects"] >= len(delayed)
    assert state["drain"]["events_delivered"] == late_delayed
    episodes = [e for e in state["shed"]["episodes"] if e["project_id"] == "p00"]
    assert len(episodes) == 1 and episodes[0]["end"] == ok[0]["since"] and episodes[0]["peak_eps"] > 3 * QUOTA
    top = state["top"]
    assert {row["project_id"] for row in top} == set(PROJECTS)
    assert all(row["state"] == "ok" for row in top)


def test_shadow_records_and_drop_drops_only_the_excess(broker, s3_client, bucket, worker_env, start_worker):
    env = worker_env(**METER_ENV)
    topic = env["STREAMAPP_EVENTS_TOPIC"]
    asyncio.run(
        publish_records(
            broker.bootstrap,
            f"{topic}-control",
            [quota_record("p00", shed_mode="shadow"), quota_record("p01", shed_mode="drop")],
        )
    )
    worker = start_worker(env)
    wait_metering([worker])
    spike_at, spike_len, factor = 4.0, 5.0, 20 * QUOTA / STEADY
    producer = Producer(
        broker.bootstrap,
        topic,
        rate=STEADY * len(PROJECTS),
        projects=PROJECTS,
        duration=spike_at + spike_len + 3,
        spikes=[("p00", factor, spike_at, spike_len), ("p01", factor, spike_at, spike_len)],
    ).start()
    sent = producer.join()
    spike_end = producer.started_at + spike_at + spike_len

    def routed() -> dict[str, Any] | None:
        counters = meter(worker)["counters"]
        p01 = counters.get("p01", {})
        return counters if p01.get("admitted", 0) + p01.get("dropped", 0) == sent["p01"] else None

    counters = wait_until(routed, 30, "the sink to route all of p01")
    # drop: only the excess is dropped, each drop counted; S3 holds exactly the admitted events.
    dropped = counters["p01"]["dropped"]
    assert dropped > 0.5 * sent["p01"] and counters["p01"]["diverted"] == 0
    want = expected(sent)
    admitted_p01 = counters["p01"]["admitted"]
    total = sum(want.values()) - dropped
    wait_until(
        lambda: sum(event_counts(exported(s3_client, bucket)).values()) >= total, 60, "events in S3", interval=1.0
    )
    time.sleep(2.0)
    objects = exported(s3_client, bucket)
    got = event_counts(objects)
    assert not [k for k in objects if k.endswith("-delayed.json.gz")], "drop and shadow divert nothing"
    p01 = {k: v for k, v in got.items() if k[0] == "p01"}
    assert all(v == 1 for v in p01.values()) and len(p01) == admitted_p01
    p01_per_second = per_second([e for k, v in objects.items() if "/p01/" in k for e in v])
    assert sum(p01_per_second.values()) == admitted_p01
    # Only the excess: everything before the spike (the first 60 events are sent within 3 s at
    # 20 ev/s, the spike starts at 4 s) and about the quota every second of the spike got through.
    assert all(("p01", n) in p01 for n in range(60)), "events under the quota are never dropped"
    records = control_records(broker.bootstrap, f"{topic}-control")
    p01_shed = next(s for s in shed_states(records, "p01") if s["state"] == "shed")
    spike_seconds = range(int(p01_shed["since"]) + 2, int(spike_end))
    assert len(spike_seconds) >= 1, (p01_shed["since"], spike_end)
    for second in spike_seconds:
        assert 0.4 * QUOTA <= p01_per_second[second] <= 2.0 * QUOTA, (second, p01_per_second[second])
    assert dropped == sent["p01"] - admitted_p01
    # shadow: routing unchanged (everything in S3 in real time), the decision recorded and counted.
    others = {k: v for k, v in want.items() if k[0] != "p01"}
    assert {k: v for k, v in got.items() if k[0] != "p01"} == others
    assert counters["p00"]["shadow_excess"] > 0.5 * sent["p00"]
    assert counters["p00"]["diverted"] == counters["p00"]["dropped"] == 0
    assert counters["p00"]["admitted"] == sent["p00"]
    shed = {(s["project_id"], s["mode"]) for s in shed_states(records) if s["state"] == "shed"}
    assert shed == {("p00", "shadow"), ("p01", "drop")}


def test_quota_change_takes_effect_on_every_worker_within_2s(broker, worker_env, start_worker):
    env1 = worker_env(**METER_ENV)
    topic = env1["STREAMAPP_EVENTS_TOPIC"]
    workers = [start_worker(env1, wait_ready=False), start_worker(worker_env(**METER_ENV), wait_ready=False)]
    for w in workers:
        w.wait_ready(60)
    wait_metering(workers)
    assert all(len(meter(w)["partitions"]) == 2 for w in workers), "both workers own partitions"
    projects = PROJECTS[:8]
    producer = Producer(broker.bootstrap, topic, rate=STEADY * len(projects), projects=projects, duration=30).start()
    time.sleep(4.0)
    target = "p03"
    assert all(meter(w, target)["project"]["quota_eps"] == QUOTA for w in workers)

    def cli(*args: str) -> str:
        env = {
            "PATH": "/usr/bin:/bin",
            "STREAMAPP_KAFKA_BOOTSTRAP": broker.bootstrap,
            "STREAMAPP_EVENTS_TOPIC": topic,
            "STREAMAPP_DEFAULT_EPS_LIMIT": str(QUOTA),
        }
        done = subprocess.run(
            [sys.executable, "-m", "streamapp", *args], check=True, cwd=PROJECT_ROOT, env=env, capture_output=True
        )
        return done.stdout.decode()

    cli_started = time.time()
    cli("quota", "set", target, "--eps", "5", "--bps", "100000")
    published = time.time()  # the quota record is on the control topic now
    seen: dict[int, float] = {}
    deadline = published + 10
    while len(seen) < len(workers) and time.time() < deadline:
        for i, w in enumerate(workers):
            if i not in seen and meter(w, target)["project"]["quota_eps"] == 5.0:
                seen[i] = time.time()
        time.sleep(0.05)
    assert len(seen) == len(workers), "every worker applies the quota"
    assert max(seen.values()) - published <= 2.0, f"applied {max(seen.values()) - published:.2f}s after publishing"
    # And it governs decisions: the owner sheds the project (20 ev/s > 5 x 1.5) right away.
    owner = next(w for w in workers if target in {row["project_id"] for row in meter(w)["top"]})
    shed = wait_until(
        lambda: next((s for s in meter(owner)["shed"]["shed"] if s["project_id"] == target), None), 5, "shed"
    )
    assert shed["limit_eps"] == 5.0 and shed["since"] - published <= 2.0
    applied = max(seen.values()) - published
    print(f"quota CLI took {published - cli_started:.2f}s; applied on both workers {applied:.2f}s later")
    listed = wait_until(
        lambda: (q := json.loads(cli("quota", "list", "--json")))["projects"][0]["state"] == "shed" and q,
        5,
        "quota list showing the shed state",
    )
    assert [(p["project_id"], p["quota_eps"], p["quota_bps"]) for p in listed["projects"]] == [(target, 5, 100000)]
    assert listed["defaults"]["quota_eps"] == QUOTA
    assert f"{target}" in cli("quota", "list")

    # Manual shed of a project under its quota, through the CLI: its owner sheds it until cleared.
    manual = "p05"
    owner = next(w for w in workers if manual in {row["project_id"] for row in meter(w)["top"]})
    cli("shed", manual, "--reason", "incident 42")
    shed = wait_until(
        lambda: next((s for s in meter(owner)["shed"]["shed"] if s["project_id"] == manual), None), 3, "manual shed"
    )
    assert (shed["manual"], shed["reason"]) == ("shed", "manual shed")
    cli("shed", manual, "--clear")
    wait_until(lambda: meter(owner, manual)["project"] and not _manual(meter(owner), manual), 3, "override cleared")
    producer.stop()
    others = {s["project_id"] for w in workers for s in meter(w)["shed"]["shed"]}
    assert others <= {target, manual}
    assert all(
        s["state"] != "shed"
        for s in shed_states(control_records(broker.bootstrap, f"{topic}-control"))
        if s["project_id"] not in (target, manual)
    )


def _manual(state: dict[str, Any], project: str) -> str | None:
    return next((s["manual"] for s in state["shed"]["shed"] if s["project_id"] == project), None)


def test_restart_during_episode_keeps_the_project_shed(broker, s3_client, bucket, worker_env, start_worker):
    overrides = {**METER_ENV, "shed_cooldown_seconds": 5}
    env = worker_env(**overrides)
    topic = env["STREAMAPP_EVENTS_TOPIC"]
    worker = start_worker(env)
    wait_metering([worker])
    projects = PROJECTS[:6]
    steady = Producer(broker.bootstrap, topic, rate=STEADY * len(projects), projects=projects, duration=300).start()
    time.sleep(3.0)
    spike = Producer(broker.bootstrap, topic, rate=10 * QUOTA, projects=["spiky"], duration=300).start()
    before = wait_until(
        lambda: next((s for s in meter(worker)["shed"]["shed"] if s["project_id"] == "spiky"), None), 10, "shed"
    )
    time.sleep(2.0)
    assert meter(worker)["shed"]["shed"][0]["episode"] == 1
    before_counters = meter(worker)["counters"]["spiky"]
    worker.stop()

    # A new worker process with an empty data dir: the state can only come from the changelogs.
    restarted = start_worker(worker_env(**overrides))
    wait_metering([restarted])
    after = meter(restarted)
    recovered = next(s for s in after["shed"]["shed"] if s["project_id"] == "spiky")
    assert (recovered["episode"], recovered["since"], recovered["reason"]) == (
        before["episode"],
        before["since"],
        before["reason"],
    ), "the episode is recovered, not re-learned"
    assert any(e.get("recovered") for e in after["shed"]["episodes"] if e["project_id"] == "spiky")
    received_before = before_counters["received"]
    assert meter(restarted)["counters"]["spiky"]["received"] >= received_before, "rate rows recovered"

    spike_sent = spike.stop()
    spike_end = time.time()
    ok = wait_until(
        lambda: not any(s["project_id"] == "spiky" for s in meter(restarted)["shed"]["shed"]),
        6 + COOLDOWN + 10,
        "spiky back to ok",
    )
    assert ok
    sent = {**steady.stop(), **spike_sent}
    records = control_records(broker.bootstrap, f"{topic}-control")
    spiky = shed_states(records, "spiky")
    assert max(s["episode"] for s in spiky) == 1, "no second episode: the restart did not re-learn the shed"
    assert spiky[-1]["state"] == "ok" and spiky[-1]["since"] - spike_end >= COOLDOWN
    assert {s["project_id"] for s in shed_states(records) if s["state"] == "shed"} == {"spiky"}
    # The sink and the drain resumed exactly once across the restart.
    want = expected(sent)
    wait_exported(s3_client, bucket, want, worker=restarted)
    objects = exported(s3_client, bucket)
    assert event_counts(objects) == want
    assert any(k.endswith("-delayed.json.gz") for k in objects)
    # Counted exactly once although the new worker re-read records the old one had counted.
    assert meter(restarted)["counters"]["spiky"]["received"] == spike_sent["spiky"]
    with urllib.request.urlopen(f"{restarted.web_url}/sink/", timeout=5) as response:
        sink = json.loads(response.read())
    gaps = [p["offset_gaps"] for p in sink["partitions"].values()]
    assert gaps and not any(gaps), "every record read once, in order"


def test_sigkill_during_a_shed_episode_loses_and_duplicates_nothing(
    broker, s3_client, bucket, worker_env, start_worker
):
    """The worst moment for the overflow lane: diversions in flight, the drain's first chunk open
    and its partition never committed, the sink's windows open. SIGKILL, then a new worker with
    an empty data dir: S3 still holds every event exactly once (real-time + delayed)."""
    env = worker_env(**METER_ENV)
    topic = env["STREAMAPP_EVENTS_TOPIC"]
    worker = start_worker(env)
    wait_metering([worker])
    steady = Producer(broker.bootstrap, topic, rate=STEADY * 6, projects=PROJECTS[:6], duration=300).start()
    time.sleep(2.0)
    spike = Producer(broker.bootstrap, topic, rate=10 * QUOTA, projects=["spiky"], duration=300).start()
    wait_until(lambda: meter(worker)["counters"].get("spiky", {}).get("diverted", 0) > 300, 15, "excess diverted")
    worker.kill()

    restarted = start_worker(worker_env(**METER_ENV))
    wait_metering([restarted])
    time.sleep(3.0)  # the spike goes on after the restart too
    sent = {**steady.stop(), **spike.stop()}
    want = expected(sent)
    wait_exported(s3_client, bucket, want, worker=restarted)
    objects = exported(s3_client, bucket)
    assert event_counts(objects) == want
    assert any(k.endswith("-delayed.json.gz") for k in objects), "the excess went the overflow way"
