"""The S3 sink end to end: real Tansu broker, real moto S3 server, real worker processes."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import Counter
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamapp.cli import produce_load
from tests.helpers import event_counts, list_keys, read_objects, wait_until

pytestmark = pytest.mark.integration

FAST_WINDOWS = {
    "STREAMAPP_WINDOW_SECONDS": "1",
    "STREAMAPP_ALLOWED_LATENESS_SECONDS": "1",
    "STREAMAPP_IDLE_FLUSH_SECONDS": "1",
}
KEY_LAYOUT = re.compile(
    r"^events/(?P<project>[\w-]+)/(?P<ws>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.000Z)/(?P<coll>[\w-]+)/"
    r"(?P=project)-(?P=coll)-(?P=ws)-p\d+-o\d+(-i\d+)?(-late)?\.json\.gz$"
)


def produce(broker: Any, topic: str, **kwargs: Any) -> dict[str, int]:
    return asyncio.run(produce_load(broker.bootstrap, topic, **kwargs))


def expected(sent: dict[str, int]) -> Counter[tuple[str, Any]]:
    return Counter({(project, n): 1 for project, count in sent.items() for n in range(count)})


def exported(s3_client: Any, bucket: str) -> Counter[tuple[str, Any]]:
    return event_counts(read_objects(s3_client, bucket, "events/"))


def test_events_land_in_s3_exactly_once_with_manifests(broker, s3_client, bucket, worker_env, start_worker) -> None:
    env = worker_env(**FAST_WINDOWS)
    start_worker(env)
    topic = env["STREAMAPP_EVENTS_TOPIC"]
    projects = [f"proj-{i}" for i in range(6)]
    sent = produce(broker, topic, rate=600, projects=projects, duration=3.5, collection="clicks")
    sent_batched = produce(broker, topic, rate=2000, projects=projects, duration=1.0, batch=50, collection="views")
    want = expected(sent) + Counter({(p, n): 1 for p, c in sent_batched.items() for n in range(c)})
    # "n" restarts per collection: count per (project, collection, n) through the key layout instead.
    wait_until(lambda: sum(exported(s3_client, bucket).values()) >= sum(want.values()), 60, what="all events in S3")
    time.sleep(2)  # anything written twice would show up now
    objects = read_objects(s3_client, bucket, "events/")
    got: Counter[tuple[str, str, Any]] = Counter()
    for key, events in objects.items():
        match = KEY_LAYOUT.match(key)
        assert match, f"key does not follow the layout: {key}"
        for event in events:
            assert set(event["keen"]) >= {"id", "timestamp", "created_at"}
            got[(match["project"], match["coll"], event["n"])] += 1
    want_full = Counter({(p, "clicks", n): 1 for p, c in sent.items() for n in range(c)})
    want_full += Counter({(p, "views", n): 1 for p, c in sent_batched.items() for n in range(c)})
    assert got == want_full
    ids = [e["keen"]["id"] for events in objects.values() for e in events]
    assert len(ids) == len(set(ids)), "keen.id must be unique"
    windows = {KEY_LAYOUT.match(k)["ws"] for k in objects}  # type: ignore[index]
    assert len(windows) >= 4, "events spread over several 1 s windows"

    # Manifests: complete windows list exactly their objects.
    def manifests() -> list[str]:
        return [k for k in list_keys(s3_client, bucket, "events/_manifests/") if k.endswith("Z.json")]

    wait_until(lambda: len(manifests()) >= len(windows), 30, what="manifests for every window")
    listed: set[str] = set()
    for key in manifests():
        manifest = json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert manifest["complete"] is True
        assert manifest["events"] == sum(o["events"] for o in manifest["objects"])
        listed.update(o["key"] for o in manifest["objects"])
    on_time = {k for k in objects if not k.endswith("-late.json.gz")}
    assert on_time <= listed


def test_invalid_records_go_to_dead_letters_and_the_worker_keeps_going(
    broker, s3_client, bucket, worker_env, start_worker
) -> None:
    env = worker_env(**FAST_WINDOWS)
    worker = start_worker(env)
    topic = env["STREAMAPP_EVENTS_TOPIC"]
    bad = [
        (b"garbage", b"\x00\xff not json at all"),
        (b"listy", b"[1, 2, 3]"),
        (b"../x", orjson.dumps({"project_id": "../x", "collection": "c", "event": {"a": 1}})),
        (b"p", orjson.dumps({"project_id": "p", "collection": "c", "event": {"a": 1}, "pad": "x" * 1_100_000})),
    ]
    good = orjson.dumps({"project_id": "good-project", "collection": "c", "event": {"n": 0}})

    async def send_and_read() -> list[dict[str, Any]]:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=4_000_000)
        await producer.start()
        try:
            for key, value in bad:
                await producer.send_and_wait(topic, value, key=key)
            await producer.send_and_wait(topic, good, key=b"good-project")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            f"{topic}-invalid", bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        found: list[dict[str, Any]] = []
        try:
            deadline = time.monotonic() + 40
            while len(found) < len(bad) and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    found.extend(orjson.loads(r.value) for r in records)
        finally:
            await consumer.stop()
        return found

    dead = asyncio.run(send_and_read())
    reasons = sorted(d["reason"] for d in dead)
    assert len(dead) == 4, reasons
    assert any("not valid JSON" in r for r in reasons)
    assert any("not an object" in r for r in reasons)
    assert any("bad project_id '../x'" in r for r in reasons)
    assert any("over the" in r and "byte limit" in r for r in reasons)
    assert all(d["topic"] == topic and isinstance(d["offset"], int) for d in dead)
    wait_until(lambda: exported(s3_client, bucket)[("good-project", 0)] == 1, 30, what="the good event in S3")
    assert worker.is_running()


def test_sigkill_in_the_middle_of_open_windows_loses_nothing_and_duplicates_nothing(
    broker, s3_client, bucket, worker_env, start_worker
) -> None:
    env = worker_env(**{**FAST_WINDOWS, "STREAMAPP_WINDOW_SECONDS": "2"})
    worker = start_worker(env)
    topic = env["STREAMAPP_EVENTS_TOPIC"]
    projects = [f"k{i}" for i in range(8)]
    result: dict[str, dict[str, int]] = {}
    producing = threading.Thread(
        target=lambda: result.update(sent=produce(broker, topic, rate=1500, projects=projects, duration=14)),
    )
    producing.start()
    wait_until(lambda: exported(s3_client, bucket), 30, what="objects written before the kill")
    time.sleep(1.0)
    worker.kill()  # SIGKILL: open windows, pending uploads and uncommitted offsets all die with it
    time.sleep(1.5)
    start_worker(env)
    producing.join()
    want = expected(result["sent"])
    wait_until(lambda: sum(exported(s3_client, bucket).values()) >= sum(want.values()), 90, what="all events")
    time.sleep(3)
    assert exported(s3_client, bucket) == want


def test_s3_outage_pauses_the_sink_and_nothing_is_lost(broker, s3, s3_client, bucket, worker_env, start_worker) -> None:
    env = worker_env(**FAST_WINDOWS, STREAMAPP_S3_TIMEOUT_SECONDS="1")
    worker = start_worker(env)
    topic = env["STREAMAPP_EVENTS_TOPIC"]
    projects = [f"o{i}" for i in range(5)]
    result: dict[str, dict[str, int]] = {}
    producing = threading.Thread(
        target=lambda: result.update(sent=produce(broker, topic, rate=800, projects=projects, duration=14)),
    )
    producing.start()
    wait_until(lambda: exported(s3_client, bucket), 30, what="objects written before the outage")
    s3.pause()  # SIGSTOP: requests hang, as with a stuck S3
    try:
        time.sleep(5)
    finally:
        s3.resume()
    producing.join()
    want = expected(result["sent"])
    wait_until(lambda: sum(exported(s3_client, bucket).values()) >= sum(want.values()), 120, what="all events")
    time.sleep(3)
    assert exported(s3_client, bucket) == want
    assert worker.is_running()
    sink = json.loads(_get(f"{worker.web_url}/sink/"))
    assert sink["s3_retries"] >= 1, "the outage was noticed and retried"


def test_late_event_lands_in_a_late_object_of_its_own_window(
    broker, s3_client, bucket, worker_env, start_worker
) -> None:
    env = worker_env(**{**FAST_WINDOWS, "STREAMAPP_WINDOW_SECONDS": "2"})
    start_worker(env)
    topic = env["STREAMAPP_EVENTS_TOPIC"]
    old = time.time() - 10  # 5 windows ago: late, and within the 8 windows that keep their own late objects
    old_iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(old)) + ".500Z"
    window = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(old // 2) * 2)) + ".000Z"

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            now_iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"
            for n in range(5):  # on time: moves the watermark to now
                body = {"project_id": "lp", "collection": "c", "event": {"n": n, "keen": {"timestamp": now_iso}}}
                await producer.send_and_wait(topic, orjson.dumps(body), key=b"lp")
            body = {"project_id": "lp", "collection": "c", "event": {"n": "late", "keen": {"timestamp": old_iso}}}
            await producer.send_and_wait(topic, orjson.dumps(body), key=b"lp")
        finally:
            await producer.stop()

    asyncio.run(send())

    def late_objects() -> dict[str, list[dict[str, Any]]]:
        return {k: v for k, v in read_objects(s3_client, bucket, "events/lp/").items() if k.endswith("-late.json.gz")}

    late = wait_until(late_objects, 30, what="a late object")
    assert len(late) == 1
    key, events = next(iter(late.items()))
    assert f"events/lp/{window}/c/lp-c-{window}-" in key
    assert [e["n"] for e in events] == ["late"]
    everything = event_counts(read_objects(s3_client, bucket, "events/lp/"))
    assert everything == Counter({("lp", n): 1 for n in [0, 1, 2, 3, 4, "late"]})


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()
