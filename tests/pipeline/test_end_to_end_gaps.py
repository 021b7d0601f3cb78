"""What no other module covered, end to end against the real broker, S3 server and workers.

One app (one consumer group, window 5 s, lateness 2 s, idle flush 1 s) is shared by the tests of
this module, in file order: per-project bucket/prefix and ``s3_streaming=false``, a multipart
upload, the overflow drain's pacing, a live rebalance with ``partial: true`` while the leaving
worker is down, and last (it restarts the worker) a missing checkpoint. ``streamapp dev --demo``
runs its own stack.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from streamapp.control import publish_records, quota_record
from streamapp.dev import PROJECT_ROOT, BrokerProcess, S3Process, WorkerProcess, free_port, produce_load, settings_env
from streamapp.dev import s3_client as make_s3_client
from streamapp.partitioning import key_partition
from streamapp.sink.s3 import MULTIPART_THRESHOLD, PART_SIZE
from tests.helpers import every_partition_has_a_watermark, list_keys, read_objects, wait_until

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "cov-admin"
WINDOW, LATENESS, IDLE = 5, 2, 1
OVERFLOW_MAX_EPS = 1000.0
SPIKY_QUOTA = 20.0


@dataclass
class App:
    """The module's app: its settings, bucket and the worker(s) of its consumer group."""

    broker: BrokerProcess
    s3: Any  # boto3 client
    bucket: str
    custom_bucket: str
    topic: str
    app_id: str
    log_dir: Path
    data_root: Path
    worker: WorkerProcess
    others: list[WorkerProcess] = field(default_factory=list)

    def env(self, n: int) -> dict[str, str]:
        return settings_env(
            kafka_bootstrap=self.broker.bootstrap,
            s3_endpoint_url=self.s3.meta.endpoint_url,
            s3_bucket=self.bucket,
            app_id=self.app_id,
            events_topic=self.topic,
            web_host="127.0.0.1",
            web_port=free_port(),
            data_dir=self.data_root / f"worker-{n}",
            admin_token=ADMIN_TOKEN,
            window_seconds=WINDOW,
            allowed_lateness_seconds=LATENESS,
            idle_flush_seconds=IDLE,
            overflow_max_eps=OVERFLOW_MAX_EPS,
            session_timeout_seconds=6,
            control_secret=f"{self.app_id}-control-secret",
            unknown_projects="export",  # its projects are never created: each is metered on its own
        )

    def start(self, n: int) -> WorkerProcess:
        worker = WorkerProcess(self.env(n), self.log_dir, name=f"{self.app_id}-worker-{n}")
        self.others.append(worker)
        worker.start()
        worker.wait_ready(90)
        return worker


@pytest.fixture(scope="module")
def app(
    request: pytest.FixtureRequest, broker: BrokerProcess, s3: S3Process, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[App]:
    name = "c" + uuid.uuid4().hex[:10]
    bucket, custom_bucket = f"{name}-bucket", f"{name}-custom"
    s3.create_bucket(bucket)
    s3.create_bucket(custom_bucket)
    topic = f"{name}-events"
    # Quotas before the worker starts: "big" (the multipart test) must never be shed for its bytes.
    asyncio.run(
        publish_records(
            broker.bootstrap,
            f"{topic}-control",
            [quota_record("big", quota_eps=1e6, quota_bps=1e10), quota_record("spiky", quota_eps=SPIKY_QUOTA)],
        )
    )
    root = tmp_path_factory.mktemp("coverage")
    shared = App(
        broker=broker,
        s3=make_s3_client(s3.endpoint_url),
        bucket=bucket,
        custom_bucket=custom_bucket,
        topic=topic,
        app_id=name,
        log_dir=root / "logs",
        data_root=root,
        worker=None,  # type: ignore[arg-type]
    )
    shared.worker = shared.start(1)
    # One event in every partition first: a partition that never saw an event writes no manifest
    # parts, so no window's manifest would ever be complete (tests/sink/test_manifest_idle_partitions.py).
    warm: dict[int, str] = {}
    for i in range(100):
        warm.setdefault(key_partition(f"warm-{i}", 4), f"warm-{i}")
    stamp = now_iso()
    asyncio.run(
        send_records(
            broker.bootstrap,
            topic,
            [
                (
                    p.encode(),
                    orjson.dumps({"project_id": p, "collection": "c", "event": {"n": 0, "keen": {"timestamp": stamp}}}),
                )
                for p in warm.values()
            ],
        )
    )
    wait_until(
        lambda: every_partition_has_a_watermark(shared.worker.web_url), 60, what="every partition with a watermark"
    )
    failed_before = request.session.testsfailed
    yield shared
    for worker in shared.others:
        worker.stop()
    if request.session.testsfailed > failed_before:
        for worker in shared.others:
            print(f"\n===== {worker.name} (exit {worker.returncode}) log tail: {worker.log_path} =====")
            print(worker.log_tail(60))


# ------------------------------------------------------------------------------------ helpers
def get_json(url: str, token: str | None = None, timeout: float = 5.0) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
        return json.loads(response.read())


def post_json(url: str, body: Any, token: str) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"


async def send_records(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=2_000_000, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def counts_under(s3_client: Any, bucket: str, projects: list[str], prefix: str = "events/") -> Counter[tuple[str, Any]]:
    """(project, event n) -> occurrences in the projects' objects under ``prefix``."""
    seen: Counter[tuple[str, Any]] = Counter()
    for project in projects:
        for events in read_objects(s3_client, bucket, f"{prefix}{project}/").values():
            for event in events:
                seen[(project, event.get("n"))] += 1
    return seen


def meter_state(web: str) -> dict[str, Any]:
    return get_json(f"{web}/_meter/", ADMIN_TOKEN)


class Load(threading.Thread):
    """produce_load in the background until ``stop()`` (or its duration); ``sent`` when done."""

    def __init__(self, bootstrap: str, topic: str, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.args, self.kwargs = (bootstrap, topic), kwargs
        self.sent: dict[str, int] = {}
        self.error: BaseException | None = None
        self.stopped = False

    def run(self) -> None:
        try:
            self.sent = asyncio.run(produce_load(*self.args, should_stop=lambda: self.stopped, **self.kwargs))
        except BaseException as exc:  # noqa: BLE001 - re-raised in result()
            self.error = exc

    def result(self, stop: bool = False) -> dict[str, int]:
        self.stopped = self.stopped or stop
        self.join(120)
        if self.error is not None:
            raise self.error
        assert not self.is_alive()
        return self.sent


def expected(sent: dict[str, int]) -> Counter[tuple[str, Any]]:
    return Counter({(p, n): 1 for p, count in sent.items() for n in range(count)})


def assigned(web: str) -> list[int]:
    try:
        with urllib.request.urlopen(f"{web}/readyz", timeout=5) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
    except OSError:
        return []
    return sorted(body.get("assigned_partitions", []))


# -------------------------------------------------------------------------------------- tests
def test_project_bucket_prefix_and_s3_streaming_false(app: App) -> None:
    """A project's own bucket and prefix (set through the admin API) get its objects and nothing
    else; an ``s3_streaming=false`` project is metered but never written; the manifest, in the
    service's bucket, lists the custom-bucket object with its bucket."""
    web = app.worker.web_url
    for body in (
        {"project_id": "custom", "bucket": app.custom_bucket, "prefix": "tenant-x/exports"},
        {"project_id": "nos3", "s3_streaming": False},
    ):
        status, reply = post_json(f"{web}/admin/projects", body, ADMIN_TOKEN)
        assert status == 201 and reply["replicated"] is True, reply
    second = int(time.time())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(second))
    window = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(second // WINDOW * WINDOW))
    records = [
        (
            p.encode(),
            orjson.dumps({"project_id": p, "collection": "c", "event": {"n": n, "keen": {"timestamp": stamp}}}),
        )
        for n in range(30)
        for p in ("custom", "nos3", "plain")
    ]
    asyncio.run(send_records(app.broker.bootstrap, app.topic, records))

    want = Counter({(p, n): 1 for n in range(30) for p in ("plain",)})
    wait_until(lambda: counts_under(app.s3, app.bucket, ["plain"]) == want, 40, what="plain's 30 events")
    custom_prefix = "tenant-x/exports/"
    wait_until(
        lambda: (
            counts_under(app.s3, app.custom_bucket, ["custom"], custom_prefix)
            == Counter({("custom", n): 1 for n in range(30)})
        ),
        40,
        what="custom's 30 events in its own bucket under its prefix",
    )
    manifest_key = f"events/_manifests/{window}.json"
    wait_until(lambda: manifest_key in list_keys(app.s3, app.bucket, "events/_manifests/"), 40, what=manifest_key)
    counters = wait_until(
        lambda: (c := meter_state(web)["counters"]).get("nos3", {}).get("admitted") == 30 and c, 20, what="nos3 routed"
    )
    assert counters["nos3"]["received"] == 30
    time.sleep(1.5)  # an object of nos3 (wrongly) written at the window's close would show now

    default_keys = list_keys(app.s3, app.bucket)
    custom_keys = list_keys(app.s3, app.custom_bucket)
    assert not [k for k in default_keys + custom_keys if "nos3" in k], "s3_streaming=false writes nothing"
    assert not [k for k in default_keys if "custom" in k], "custom's objects only in its own bucket"
    assert custom_keys and all(k.startswith("tenant-x/exports/custom/") for k in custom_keys), custom_keys
    assert counts_under(app.s3, app.bucket, ["plain"]) == want
    manifest = json.loads(app.s3.get_object(Bucket=app.bucket, Key=manifest_key)["Body"].read())
    entries = {o["key"]: o for o in manifest["objects"]}
    assert set(entries) == {k for k in custom_keys + default_keys if f"/{window}/" in k and "_manifests" not in k}
    assert {entries[k]["bucket"] for k in custom_keys} == {app.custom_bucket}
    # The fixture's warm-up events (one per partition, "warm-*") may fall in the same window.
    others = {o["project_id"] for o in manifest["objects"]} - {"plain", "custom"}
    assert all(project.startswith("warm-") for project in others), others
    assert sum(o["events"] for o in manifest["objects"] if o["project_id"] in ("plain", "custom")) == 60


def test_an_object_over_the_multipart_threshold_is_uploaded_in_parts_and_reads_back_whole(app: App) -> None:
    """``S3Writer.put`` switches to a multipart upload at ``MULTIPART_THRESHOLD`` gzip bytes (16 MiB;
    ``STREAMAPP_MAX_OBJECT_BYTES`` is rotation, not this): one window of incompressible events
    gives one object over it, written in 8 MiB parts, that reads back event for event."""
    events, per_record = 280, 10
    blobs = {n: base64.b64encode(os.urandom(67_000)).decode() for n in range(events)}
    assert sum(len(b) for b in blobs.values()) * 0.74 > MULTIPART_THRESHOLD, "gzip of base64 keeps ~3/4"
    # Start at the beginning of a window: every event is on time in one window.
    while time.time() % WINDOW > 0.5:
        time.sleep(0.05)
    stamp = now_iso()
    records = []
    for first in range(0, events, per_record):
        batch = [{"n": n, "blob": blobs[n], "keen": {"timestamp": stamp}} for n in range(first, first + per_record)]
        records.append((b"big", orjson.dumps({"project_id": "big", "collection": "blobs", "events": batch})))
    asyncio.run(send_records(app.broker.bootstrap, app.topic, records))

    def objects() -> list[str]:
        return [k for k in list_keys(app.s3, app.bucket, "events/big/") if k.endswith(".json.gz")]

    keys = wait_until(objects, 60, what="the big object")
    time.sleep(1.0)
    keys = objects()
    assert len(keys) == 1 and not keys[0].endswith("-late.json.gz"), keys
    head = app.s3.head_object(Bucket=app.bucket, Key=keys[0])
    size = head["ContentLength"]
    assert size >= MULTIPART_THRESHOLD, size
    parts = -(-size // PART_SIZE)
    assert head["ETag"].strip('"').endswith(f"-{parts}"), (head["ETag"], parts)  # a multipart upload's ETag
    body = gzip.decompress(app.s3.get_object(Bucket=app.bucket, Key=keys[0])["Body"].read())
    got = [orjson.loads(line) for line in body.splitlines()]
    assert sorted(e["n"] for e in got) == list(range(events))
    assert all(
        hashlib.sha256(e["blob"].encode()).digest() == hashlib.sha256(blobs[e["n"]].encode()).digest() for e in got
    )


def test_the_drain_delivers_a_shed_projects_excess_at_no_more_than_overflow_max_eps(app: App) -> None:
    """12,000+ excess events of a project shed at 20 ev/s, drained at STREAMAPP_OVERFLOW_MAX_EPS=1000:
    chunks of up to 5,000 events, each delivery reserving events/1000 s. Measured from the drain's
    own status (sampled every 0.2 s): after the first chunk, no more than 1000 ev/s; and every event
    once in S3 (real-time + delayed)."""
    web = app.worker.web_url
    drain0 = meter_state(web)["drain"]
    load = Load(app.broker.bootstrap, app.topic, rate=3000, projects=["spiky"], duration=4.5, collection="burst")
    load.start()
    samples: list[tuple[float, int]] = []
    sent: dict[str, int] | None = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = meter_state(web)
        delivered = state["drain"]["events_delivered"] - drain0["events_delivered"]
        samples.append((time.monotonic(), delivered))
        if sent is None and not load.is_alive():
            sent = load.result()
        counters = state["counters"].get("spiky", {})
        routed = counters.get("admitted", 0) + counters.get("diverted", 0)
        if sent is not None and routed == sent["spiky"] and delivered == counters["diverted"]:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"drain did not finish: {samples[-1]}, counters {counters}")
    diverted = counters["diverted"]
    assert diverted > 10_000, "enough excess for several paced chunks"
    steps = [(t, d) for (t, d), (_, before) in zip(samples[1:], samples, strict=False) if d > before]
    assert len(steps) >= 3, steps
    (t_first, d_first), (t_last, d_last) = steps[0], steps[-1]
    # A delivery is seen up to one sample (0.2 s) late: allow that on the measured interval.
    rate = (d_last - d_first) / (t_last - t_first + 0.25)
    assert rate <= OVERFLOW_MAX_EPS * 1.05, (rate, steps)
    assert state["drain"]["paced_seconds"] > drain0["paced_seconds"]

    want = expected(sent)  # type: ignore[arg-type]

    def spiky() -> Counter[tuple[str, Any]]:
        return counts_under(app.s3, app.bucket, ["spiky"])

    wait_until(lambda: sum(spiky().values()) >= sum(want.values()), 60, what="all of spiky's events in S3")
    time.sleep(1.0)
    assert spiky() == want
    delayed = [k for k in list_keys(app.s3, app.bucket, "events/spiky/") if k.endswith("-delayed.json.gz")]
    assert sum(len(v) for k, v in read_objects(app.s3, app.bucket, "events/spiky/").items() if k in delayed) == diverted


def test_a_live_rebalance_keeps_every_event_exactly_once_and_a_dead_peer_makes_views_partial(app: App) -> None:
    """A second worker joins mid-stream (partitions move away from the first), then dies (SIGKILL):
    until the group notices, the first worker's merged views say ``partial: true`` and name the dead
    peer; then the first takes every partition back. S3 holds every event exactly once."""
    first = app.worker
    projects = [f"rb-{i}" for i in range(8)]
    load = Load(app.broker.bootstrap, app.topic, rate=400, projects=projects, duration=120, collection="rb")
    load.start()
    try:
        time.sleep(2)
        second = app.start(2)
        wait_until(
            lambda: (
                assigned(first.web_url)
                and assigned(second.web_url)
                and sorted(assigned(first.web_url) + assigned(second.web_url)) == [0, 1, 2, 3]
            ),
            60,
            what="partitions split between the two workers",
        )
        wait_until(
            lambda: get_json(f"{second.web_url}/sink/?local=1")["objects_written"] > 0, 30, what="the second writes"
        )
        second.kill()
        rates = get_json(f"{first.web_url}/rates/")
        assert rates["partial"] is True, rates["workers"]
        assert rates["workers"][first.web_url] == "ok" and rates["workers"][second.web_url] != "ok", rates["workers"]
        wait_until(lambda: assigned(first.web_url) == [0, 1, 2, 3], 60, what="the first takes every partition back")
        time.sleep(2)  # the stream goes on after the rebalance too
        assert get_json(f"{first.web_url}/rates/")["partial"] is False
    finally:
        sent = load.result(stop=True)
    want = expected(sent)

    def got() -> Counter[tuple[str, Any]]:
        return counts_under(app.s3, app.bucket, projects)

    wait_until(lambda: sum(got().values()) >= sum(want.values()), 90, what="every event in S3")
    time.sleep(2)
    assert got() == want


def test_a_missing_checkpoint_is_logged_and_nothing_is_lost(app: App) -> None:
    """Behaviour (streamapp/sink/service.py ``S3Sink._open``; not in the README or ARCHITECTURE.md):
    with no checkpoint at a partition's committed offset the worker logs an error and starts the
    partition there with an empty state. Nothing before the offset is read again (it is durable);
    the replayed range may be written again (the skip list and watermark were in the checkpoint),
    so the promise is at-least-once for that range: nothing is lost, duplicates are possible.

    The worker is SIGKILLed mid-stream, the newest two checkpoints of every partition (the committed
    offset's among them) are deleted, a new worker takes over while the stream goes on."""
    projects = [f"ck-{i}" for i in range(8)]
    load = Load(app.broker.bootstrap, app.topic, rate=400, projects=projects, duration=120, collection="ck")
    load.start()
    try:
        wait_until(
            lambda: counts_under(app.s3, app.bucket, projects).keys() & {(p, 0) for p in projects},
            30,
            what="the stream in S3",
        )
        time.sleep(2)
        app.worker.kill()
        prefix = f"events/_checkpoints/{app.app_id}/{app.topic}/"
        deleted = []
        for partition in range(4):
            keys = sorted(list_keys(app.s3, app.bucket, f"{prefix}{partition}/"))
            for key in keys[-2:]:
                app.s3.delete_object(Bucket=app.bucket, Key=key)
                deleted.append(key)
        assert deleted
        app.worker = app.start(3)
        wait_until(lambda: "no checkpoint for" in app.worker.log_tail(400), 60, what="the missing checkpoint logged")
        time.sleep(3)  # the stream goes on on the new worker
    finally:
        sent = load.result(stop=True)
    want = expected(sent)

    def got() -> Counter[tuple[str, Any]]:
        return counts_under(app.s3, app.bucket, projects)

    wait_until(lambda: set(want) <= set(got()), 90, what="every event in S3")
    counts = got()
    assert set(counts) == set(want), "nothing lost, nothing invented"
    duplicates = sum(v - 1 for v in counts.values())
    print(f"missing checkpoint: {len(want)} events, {duplicates} written twice (at-least-once range)")
    assert app.worker.is_running()


def test_make_run_demo_path(tmp_path: Path) -> None:
    """``streamapp dev --demo`` (what ``make run`` runs) on free ports: demo traffic reaches S3, the
    spiking demo project is shed (its first spike starts 15 s into the demo), Ctrl-C exits 0
    (--duration's clean exit: tests/cli/test_dev_command.py)."""
    info_file = tmp_path / "info.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMAPP_")}
    command = [
        sys.executable, "-m", "streamapp", "dev", "--demo", "--duration", "120",
        "--kafka-port", str(free_port()), "--s3-port", str(free_port()), "--web-port", str(free_port()),
        "--info-file", str(info_file), "--data-dir", str(tmp_path / "dev"),
    ]  # fmt: skip
    dev = subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_until(info_file.exists, 90, what="the info file")  # broker, S3 server, worker spawned
        info = json.loads(info_file.read_text())
        client = make_s3_client(info["s3_endpoint_url"])

        def demo_objects() -> list[str]:
            try:
                keys = list_keys(client, info["bucket"], "events/")
            except Exception:  # noqa: BLE001 - the bucket may not exist for a moment
                return []
            return [k for k in keys if k.startswith("events/demo-") and k.endswith(".json.gz")]

        def shed_projects() -> list[str] | None:
            try:
                return [s["project_id"] for s in get_json(f"{info['web']}/shed/", info["admin_token"])["shed"]]
            except OSError:
                return None  # not answering (yet)

        keys = wait_until(demo_objects, 60, what="demo objects in S3")
        shed = wait_until(shed_projects, 60, what="a shed demo project")
        assert shed == ["demo-00"], shed
        dev.send_signal(signal.SIGINT)  # Ctrl-C, as after `make run` (--duration is only the cap here)
        output, _ = dev.communicate(timeout=90)
    finally:
        if dev.poll() is None:
            dev.kill()
            output, _ = dev.communicate(timeout=30)
            print(output[-3000:])
    assert dev.returncode == 0, output[-3000:]
    assert len({k.split("/")[1] for k in keys}) >= 2, keys
    assert "[status]" in output and "curl" in output
