"""Issue #9 item 6: a tenant's S3 destination fails, only that tenant waits.

Real Tansu broker, real moto S3 server, real worker processes. A project exports to its own
bucket, which does not exist; it writes more objects per window than there are upload slots.
A neighbour on the SAME events partition must still be in S3 within window + lateness + idle
flush + 10 s, the partition's commit must move past the tenant's records, and once the bucket
exists (and an operator says "retry now") the tenant's events arrive exactly once, with the
same keys and bytes as parked, even across a SIGKILL of the worker while parked.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamapp.control import ProjectSettings, project_record, publish_records
from streamapp.dev import PROJECT_ROOT
from streamapp.partitioning import key_partition
from streamapp.sink.parking_book import parked_root
from tests.helpers import list_keys, wait_until

pytestmark = pytest.mark.integration

WINDOW, LATENESS, IDLE = 5, 2, 1
BOUND = WINDOW + LATENESS + IDLE + 10  # the bound for the neighbour, seconds after its last event
CONCURRENCY = 2  # the sink holds 2 x this upload slots: 4
COLLECTIONS = [f"c{i}" for i in range(8)]  # 8 tenant objects per window: more than the slots
ADMIN_TOKEN = "parking-admin"
PARTITIONS = 4


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def neighbour_of(project_id: str) -> str:
    """A project id on the same events partition as ``project_id``."""
    want = key_partition(project_id, PARTITIONS)
    return next(f"nb{i}" for i in range(1000) if key_partition(f"nb{i}", PARTITIONS) == want)


async def produce(bootstrap: str, topic: str, tenant: str, neighbour: str, seconds: float) -> dict[str, Any]:
    """Both projects stream for ``seconds``; returns counts and the tenant's highest offset."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    sent: Counter[str] = Counter()
    tenant_offsets: list[int] = []
    try:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            futures = []
            for collection in COLLECTIONS:
                events = [{"n": sent[tenant] + i, "collection": collection} for i in range(5)]
                body = {"project_id": tenant, "collection": collection, "events": events}
                futures.append((tenant, await producer.send(topic, orjson.dumps(body), key=tenant.encode())))
                sent[tenant] += len(events)
            body = {"project_id": neighbour, "collection": "clicks", "event": {"n": sent[neighbour]}}
            futures.append((neighbour, await producer.send(topic, orjson.dumps(body), key=neighbour.encode())))
            sent[neighbour] += 1
            for project, future in futures:
                metadata = await future
                if project == tenant:
                    tenant_offsets.append(metadata.offset)
            await asyncio.sleep(0.1)
    finally:
        await producer.stop()
    return {"sent": sent, "tenant_max_offset": max(tenant_offsets), "done_at": time.monotonic()}


def keen_ids(s3_client: Any, bucket: str, prefix: str) -> Counter[str]:
    seen: Counter[str] = Counter()
    for key in list_keys(s3_client, bucket, prefix):
        if key.endswith(".json.gz"):
            body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
            for line in gzip.decompress(body).splitlines():
                seen[orjson.loads(line)["keen"]["id"]] += 1
    return seen


async def notices(bootstrap: str, topic: str, expect: int) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    out: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 20
        while len(out) < expect and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            out.extend(orjson.loads(r.value) for records in batches.values() for r in records)
    finally:
        await consumer.stop()
    return out


def dashboard_shows_parked(web_url: str, project_id: str) -> None:
    """The dashboard (real headless Chromium) lists the parked project with its reason."""
    from playwright.sync_api import sync_playwright

    from tests.web.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(web_url + "/")
            row = page.wait_for_selector(f'#parked tr[data-parked="{project_id}"]', timeout=15_000)
            assert row is not None and "NoSuchBucket" in row.inner_text()
            assert page.locator("#parked tbody tr").count() == 1, "only the tenant is parked"
            assert not errors, f"JavaScript errors on the page: {errors}"
        finally:
            browser.close()


def test_a_tenant_with_a_missing_bucket_waits_alone_and_gets_its_events_exactly_once(
    broker, s3, s3_client, bucket, worker_env, start_worker, unique_name
) -> None:
    tenant, tenant_bucket = "tenant", f"{unique_name}-tenant"  # the bucket does not exist yet
    neighbour = neighbour_of(tenant)
    partition = key_partition(tenant, PARTITIONS)
    env = worker_env(
        window_seconds=WINDOW,
        allowed_lateness_seconds=LATENESS,
        idle_flush_seconds=IDLE,
        s3_upload_concurrency=CONCURRENCY,
        s3_parked_retry_seconds=600,  # only a rediscovery or the operator's command retries in this test
        admin_token=ADMIN_TOKEN,
        topic_partitions=PARTITIONS,
    )
    topic = env["STREAMAPP_EVENTS_TOPIC"]
    control_topic = f"{topic}-control"
    project = ProjectSettings(tenant, bucket=tenant_bucket, prefix="export")
    asyncio.run(publish_records(broker.bootstrap, control_topic, [project_record(project)]))
    worker = start_worker(env)
    wait_until(lambda: ready(worker.web_url), 60, what="worker ready (control plane caught up, partitions assigned)")

    produced = asyncio.run(produce(broker.bootstrap, topic, tenant, neighbour, seconds=3.0))
    sent = produced["sent"]

    # The neighbour on the same partition is not held up by the tenant's failing bucket.
    def neighbour_done() -> bool:
        objects = [k for k in list_keys(s3_client, bucket, f"events/{neighbour}/") if k.endswith(".json.gz")]
        return bool(objects) and sum(keen_ids(s3_client, bucket, f"events/{neighbour}/").values()) >= sent[neighbour]

    wait_until(neighbour_done, BOUND - (time.monotonic() - produced["done_at"]), what="the neighbour's events in S3")
    neighbour_seconds = time.monotonic() - produced["done_at"]
    assert neighbour_seconds <= BOUND
    print(f"neighbour's {sent[neighbour]} events in S3 {neighbour_seconds:.1f}s after its last event (bound {BOUND}s)")
    neighbour_ids = keen_ids(s3_client, bucket, f"events/{neighbour}/")
    assert len(neighbour_ids) == sent[neighbour] and set(neighbour_ids.values()) == {1}

    # The partition's commit moves past the tenant's records; the tenant is parked with its reason.
    def committed() -> int:
        return int(get_json(worker.web_url + "/sink/")["partitions"].get(str(partition), {}).get("committed_offset", 0))

    wait_until(lambda: committed() > produced["tenant_max_offset"], 15, what="the commit past the tenant's records")
    sink = get_json(worker.web_url + "/sink/")
    state = sink["parked"][tenant]
    assert state["parked"] is True and "NoSuchBucket" in state["reason"] and state["since"] > 0
    root = parked_root("events", env["STREAMAPP_APP_ID"], topic)
    parked_keys = sorted(list_keys(s3_client, bucket, root))
    assert len(parked_keys) >= len(COLLECTIONS), "more tenant objects than upload slots were parked"
    assert state["backlog_objects"] == len(parked_keys) == sink["parked_objects"]
    assert state["backlog_bytes"] == sum(
        s3_client.head_object(Bucket=bucket, Key=k)["ContentLength"] for k in parked_keys
    )
    metrics = urllib.request.urlopen(worker.web_url + "/metrics", timeout=5).read().decode()
    assert f'streamapp_parked_objects{{project="{tenant}"}} {float(len(parked_keys))}' in metrics
    parked_bodies = {k: s3_client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in parked_keys}
    prefix = f"{root}{partition}/{tenant}/{tenant_bucket}/"
    assert all(k.startswith(prefix) for k in parked_keys)

    dashboard_shows_parked(worker.web_url, tenant)
    listing = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamapp",
            "sink",
            "parked",
            "--json",
            "--web",
            worker.web_url,
            "--token",
            ADMIN_TOKEN,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=PROJECT_ROOT,
    )
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout)[tenant]["backlog_objects"] == len(parked_keys)

    # SIGKILL while parked: the restarted worker finds the parked objects by listing.
    worker.kill()
    worker = start_worker(env)
    wait_until(lambda: ready(worker.web_url), 60, what="restarted worker ready")
    wait_until(
        lambda: (
            get_json(worker.web_url + "/sink/")["parked"].get(tenant, {}).get("backlog_objects") == len(parked_keys)
        ),
        20,
        what="the restarted worker's parked state",
    )
    # It shows the reason the objects were parked for as soon as it shows them.
    assert "NoSuchBucket" in get_json(worker.web_url + "/sink/")["parked"][tenant]["reason"]
    # Found objects are retried at once; wait for that attempt to fail (the bucket is still missing),
    # so the operator's command below is what redelivers them, not a retry racing the bucket's creation.
    wait_until(
        lambda: "NoSuchBucket" in get_json(worker.web_url + "/sink/")["parked"][tenant]["last_error"],
        20,
        what="the restarted worker's first redelivery attempt to fail",
    )
    assert get_json(worker.web_url + "/sink/")["parked"][tenant]["redelivery_attempts"] >= 1

    # The bucket appears; the operator asks for a retry now (the retry interval is 600 s).
    s3.create_bucket(tenant_bucket)
    command = [sys.executable, "-m", "streamapp", "sink", "retry-parked", "--project", tenant]
    command += ["--web", worker.web_url, "--token", ADMIN_TOKEN]
    answer = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=PROJECT_ROOT)
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["retried"] == [tenant]

    retried_at = time.monotonic()
    wait_until(lambda: tenant not in get_json(worker.web_url + "/sink/")["parked"], 30, what="the parked state clears")
    print(f"{len(parked_keys)} parked objects redelivered {time.monotonic() - retried_at:.1f}s after retry-parked")
    tenant_ids = keen_ids(s3_client, tenant_bucket, "export/")
    assert sum(tenant_ids.values()) == sent[tenant] and set(tenant_ids.values()) == {1}, "exactly once by keen.id"
    assert list_keys(s3_client, bucket, root) == [], "parked copies deleted after redelivery"
    delivered = sorted(list_keys(s3_client, tenant_bucket, "export/"))
    assert delivered == sorted(k[len(prefix) :] for k in parked_keys), "the same keys as parked"
    for parked, body in parked_bodies.items():
        head = s3_client.get_object(Bucket=tenant_bucket, Key=parked[len(prefix) :])
        assert head["Body"].read() == body, "the same bytes as parked"
        assert head["Metadata"] == {} and head["ContentType"] == "application/gzip"
    assert get_json(worker.web_url + "/sink/")["parked_objects"] == 0
    assert worker.is_running()

    # The object notices say what happened: parked first, redelivered later, for every tenant object.
    records = asyncio.run(notices(broker.bootstrap, f"{topic}-s3-objects", 2 * len(parked_keys)))
    by_status: dict[str, set[str]] = {}
    for record in records:
        if record.get("project_id") == tenant:
            by_status.setdefault(record.get("status"), set()).add(record["key"])
    assert by_status.get("parked") == set(delivered) == by_status.get("redelivered")
    assert all("NoSuchBucket" in r["reason"] for r in records if r.get("status") == "parked")
    assert "written" not in by_status
