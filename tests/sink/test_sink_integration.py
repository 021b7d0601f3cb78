"""The S3 sink end to end: real Tansu broker, real moto S3 server, real worker processes."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import re
import threading
import time
from collections import Counter
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamapp.contract import DEAD_LETTER_PREVIEW_BYTES
from streamapp.dev import produce_load
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

    # Manifests: each window with on-time objects gets one that lists exactly those objects, with
    # the events, bytes and source positions that are in S3, and totals that add up.
    on_time = {k: v for k, v in objects.items() if not k.endswith("-late.json.gz")}
    on_time_windows = {KEY_LAYOUT.match(k)["ws"] for k in on_time}  # type: ignore[index]

    def manifests() -> dict[str, dict[str, Any]]:
        keys = [f"events/_manifests/{ws}.json" for ws in sorted(on_time_windows)]
        present = set(list_keys(s3_client, bucket, "events/_manifests/"))
        if not set(keys) <= present:
            return {}
        return {k: json.loads(s3_client.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in keys}

    listed: dict[str, dict[str, Any]] = {}
    for key, manifest in wait_until(manifests, 30, what="a manifest for every window").items():
        assert manifest["complete"] is True and manifest["partitions"] == 4
        assert manifest["events"] == sum(o["events"] for o in manifest["objects"])
        assert manifest["bytes"] == sum(o["bytes"] for o in manifest["objects"])
        ws = key.rsplit("/", 1)[1].removesuffix(".json")
        for entry in manifest["objects"]:
            assert KEY_LAYOUT.match(entry["key"])["ws"] == ws, (key, entry["key"])  # type: ignore[index]
            listed[entry["key"]] = entry
    assert set(listed) == set(on_time), "the manifests list exactly the on-time objects"
    for key, entry in listed.items():
        body = gzip.decompress(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert (entry["events"], entry["bytes"]) == (len(body.splitlines()), len(body)), key
        positions = [_position(e["keen"]["id"]) for e in objects[key]]
        assert (entry["first_position"], entry["last_position"]) == (min(positions), max(positions)), key
        assert key.endswith(f"-o{min(positions) >> 20}.json.gz") or f"-o{min(positions) >> 20}-i" in key
    assert sum(e["events"] for e in listed.values()) == sum(len(v) for v in on_time.values())


def _position(keen_id: str) -> int:
    """A keen.id's source position (offset << 20 | index): 4 hex partition, 14 hex offset, 6 hex index."""
    return (int(keen_id[4:18], 16) << 20) | int(keen_id[18:24], 16)


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

    async def send_and_read() -> tuple[dict[tuple[int, int], int], list[Any]]:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=4_000_000)
        await producer.start()
        sent: dict[tuple[int, int], int] = {}  # (partition, offset) -> index into bad
        try:
            for i, (key, value) in enumerate(bad):
                meta = await producer.send_and_wait(topic, value, key=key)
                sent[(meta.partition, meta.offset)] = i
            await producer.send_and_wait(topic, good, key=b"good-project")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            f"{topic}-invalid",
            bootstrap_servers=broker.bootstrap,
            auto_offset_reset="earliest",
            fetch_max_bytes=8_000_000,
            max_partition_fetch_bytes=8_000_000,
        )
        await consumer.start()
        found: list[Any] = []
        try:
            # Read until the four arrived, then 3 s more: a fifth (the good record, a duplicate) must not come.
            deadline = time.monotonic() + 40
            quiet_until = float("inf")
            while time.monotonic() < min(deadline, quiet_until):
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    found.extend(records)
                if len(found) >= len(bad) and quiet_until == float("inf"):
                    quiet_until = time.monotonic() + 3
        finally:
            await consumer.stop()
        return sent, found

    sent, records = asyncio.run(send_and_read())
    dead = [orjson.loads(r.value) for r in records]
    assert len(dead) == 4, sorted(d["reason"] for d in dead)
    by_source = {}
    for record, letter in zip(records, dead, strict=True):
        assert letter["topic"] == topic
        index = sent[(letter["partition"], letter["offset"])]
        by_source[index] = letter
        key, value = bad[index]
        assert record.key == key, "the dead letter keeps the record's key"
        assert letter["key"] == key.decode()
        if len(value) <= DEAD_LETTER_PREVIEW_BYTES:
            assert letter["value"] == value.decode("utf-8", "replace"), "the dead letter holds the record's bytes"
        else:  # bounded: a preview plus the original's size and hash (the record stays in the events topic)
            assert letter["value_truncated"] is True and letter["value_bytes"] == len(value)
            assert letter["value_sha256"] == hashlib.sha256(value).hexdigest()
            assert value.decode("utf-8", "replace").startswith(letter["value"]) and len(letter["value"]) > 1000
    assert sorted(by_source) == [0, 1, 2, 3], "each bad record dead-lettered once"
    assert "not valid JSON" in by_source[0]["reason"]
    assert "not an object" in by_source[1]["reason"]
    assert "bad project_id '../x'" in by_source[2]["reason"]
    assert "over the" in by_source[3]["reason"] and "byte limit" in by_source[3]["reason"]
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
    wait_until(lambda: any(committed_offsets(worker).values()), 30, what="a first commit")
    s3.pause()  # SIGSTOP: requests hang, as with a stuck S3
    try:
        # A commit whose checkpoint was already written may still go through: give it 1.5 s, then
        # no commit may happen while S3 is down (the checkpoint for the offset cannot be written).
        time.sleep(1.5)
        during = committed_offsets(worker)
        highwater = highwaters(worker)
        time.sleep(3.5)
        assert committed_offsets(worker) == during, "no commit while S3 is down"
        assert sum(highwaters(worker).values()) > sum(highwater.values()), "events kept coming meanwhile"
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
    after, ends = committed_offsets(worker), highwaters(worker)
    assert any(ends[p] > during[p] for p in during)
    assert all(after[p] > during[p] for p in during if ends[p] > during[p]), ("commits resumed", during, after)


def committed_offsets(worker: Any) -> dict[str, int]:
    """partition -> offset the worker committed (after the checkpoint for it was in S3)."""
    sink = json.loads(_get(f"{worker.web_url}/sink/"))
    return {p: info["committed_offset"] for p, info in sink["partitions"].items()}


def highwaters(worker: Any) -> dict[str, int]:
    sink = json.loads(_get(f"{worker.web_url}/sink/"))
    return {p: info["highwater"] for p, info in sink["partitions"].items()}


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
