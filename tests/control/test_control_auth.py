"""Control records (watermark ticks, shed markers) are obeyed only when a worker signed them.

Unit part: the signature (bound to topic, partition, key and value; deterministic) and
``S3Sink._control`` against any bytes (hypothesis). Integration part: forged ``\\x00shed`` and
``\\x00tick`` records written by a plain producer into a real worker's events topic are not
obeyed, are counted (/sink/, /metrics) and dead-lettered; the worker's own ticks still close
windows (every event reaches S3 only through them). Genuine shedding is covered by
tests/metering/test_meter_integration.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamapp.contract import CONTROL_SIG_HEADER, SHED_KEY, TICK_KEY, invalid_record_value
from streamapp.control import (
    ShedMarker,
    Tick,
    control_headers,
    control_secrets,
    parse_control,
    verify_control,
)
from streamapp.dev import PROJECT_ROOT
from streamapp.metrics import Metrics
from streamapp.settings import Settings
from streamapp.sink.partition import PartitionWindows
from streamapp.sink.service import S3Sink
from tests.conftest import CONTROL_SECRET
from tests.helpers import list_keys, read_objects, wait_until

SECRET = b"s3cret"
TOPIC = "events"


# ----------------------------------------------------------------------- signature
def test_signature_binds_topic_partition_key_and_value_and_is_deterministic() -> None:
    value = orjson.dumps({"watermark": 1700000000.5})
    headers = control_headers(SECRET, TOPIC, 2, TICK_KEY, value)
    assert headers == control_headers(SECRET, TOPIC, 2, TICK_KEY, value), "replays must verify the same"
    assert verify_control(SECRET, TOPIC, 2, TICK_KEY, value, headers) is None
    assert "bad signature" in verify_control(SECRET, TOPIC, 3, TICK_KEY, value, headers)  # other partition
    assert "bad signature" in verify_control(SECRET, "other", 2, TICK_KEY, value, headers)  # other topic
    assert "bad signature" in verify_control(SECRET, TOPIC, 2, SHED_KEY, value, headers)  # other key
    assert "bad signature" in verify_control(SECRET, TOPIC, 2, TICK_KEY, value + b" ", headers)  # other value
    assert "bad signature" in verify_control(b"other", TOPIC, 2, TICK_KEY, value, headers)  # other secret
    assert "without" in verify_control(SECRET, TOPIC, 2, TICK_KEY, value, None)
    assert "without" in verify_control(SECRET, TOPIC, 2, TICK_KEY, value, [("x", b"y")])
    assert verify_control(b"", TOPIC, 2, TICK_KEY, value, headers) == "no control secret configured"


def test_rotation_signs_with_the_first_secret_and_accepts_each() -> None:
    keys = control_secrets(" new , old ")
    assert keys == (b"new", b"old") and control_secrets("") == ()
    value = b'{"watermark": 1}'
    by_old = control_headers(b"old", TOPIC, 0, TICK_KEY, value)
    assert verify_control(keys, TOPIC, 0, TICK_KEY, value, by_old) is None
    assert verify_control((b"new",), TOPIC, 0, TICK_KEY, value, by_old) is not None
    sink = new_sink("new,old")
    assert sink._control_secret == b"new"


@pytest.mark.parametrize(
    "key,value,want",
    [
        (TICK_KEY, b'{"watermark": 12.5}', Tick(12.5)),
        (TICK_KEY, b"[]", "not an object"),
        (TICK_KEY, b"\xff\xfe", "not JSON"),
        (TICK_KEY, None, "numeric"),
        (TICK_KEY, b'{"watermark": true}', "numeric"),
        (TICK_KEY, b'{"watermark": "1e12"}', "numeric"),
        (TICK_KEY, b'{"watermark": 1e400}', "not JSON"),  # orjson refuses infinities
        (SHED_KEY, b'{"project_id": "a", "mode": "drop", "fraction": 0}', ShedMarker("a", "drop", 0.0)),
        (SHED_KEY, b'{"project_id": "a", "mode": "divert", "fraction": 7}', ShedMarker("a", "divert", 1.0)),
        (SHED_KEY, b'{"project_id": "a", "mode": "nonsense"}', ShedMarker("a", "ok", 1.0)),
        (SHED_KEY, b'{"project_id": ["a"], "mode": "drop"}', "project_id"),
        (SHED_KEY, b'{"project_id": "a", "mode": "drop", "fraction": null}', "fraction"),
        (SHED_KEY, b'{"project_id": "a", "mode": "drop", "fraction": [1]}', "fraction"),
        (b"\x00future", b"{}", "unknown control record key"),
    ],
)
def test_parse_control_never_raises(key: bytes, value: bytes | None, want: Any) -> None:
    got = parse_control(key, value)
    if isinstance(want, str):
        assert isinstance(got, str) and want in got
    else:
        assert got == want


# ----------------------------------------------------------------- S3Sink._control
def new_sink(secret: str = SECRET.decode()) -> S3Sink:
    settings = Settings(control_secret=secret, events_topic=TOPIC)
    return S3Sink(  # only ``_control`` is used: settings (secret, topic) and metrics
        app=None,  # type: ignore[arg-type]
        settings=settings,
        s3=None,  # type: ignore[arg-type]
        checkpoints=None,  # type: ignore[arg-type]
        parking=None,  # type: ignore[arg-type]
        overflow=None,  # type: ignore[arg-type]
        control=None,  # type: ignore[arg-type]
        export_target=lambda project: None,
        invalid_topic="",
        overflow_topic="",
        objects_topic="",
        metrics=Metrics(),
        spawn=lambda coro: None,
    )


def new_windows(partition: int = 1) -> PartitionWindows:
    return PartitionWindows(
        TOPIC,
        partition,
        window_seconds=10,
        lateness=5,
        max_object_bytes=1 << 20,
        max_event_bytes=100_000,
        max_record_bytes=1_000_000,
        target=lambda project: ("b", "events"),
        manifest_target=("b", "events"),
        checkpoint=None,
    )


def test_control_obeys_only_signed_records_and_dead_letters_the_rest() -> None:
    sink, windows = new_sink(), new_windows(partition=1)
    tick = orjson.dumps({"watermark": 1e12})
    shed = orjson.dumps({"project_id": "victim", "mode": "drop", "fraction": 0})
    forged = [
        (TICK_KEY, tick, None),
        (SHED_KEY, shed, []),
        (SHED_KEY, shed, control_headers(b"guessed", TOPIC, 1, SHED_KEY, shed)),
        (TICK_KEY, tick, control_headers(SECRET, TOPIC, 0, TICK_KEY, tick)),  # copied from partition 0
        (TICK_KEY, b"[]", None),
    ]
    for offset, (key, value, headers) in enumerate(forged):
        sink._control(windows, offset, key, value, headers)
    assert windows.watermark == float("-inf") and dict(windows.routes) == {}
    assert windows.read_offset == len(forged), "read past, like skip_record"
    assert [item.offset for item in windows.invalid] == list(range(len(forged)))
    assert all("control record" in item.reason for item in windows.invalid)
    assert sink.control_rejected == len(forged)
    assert sink.metrics.registry.get_sample_value("streamapp_control_records_rejected_total") == len(forged)
    # The same offsets again (a redelivery): read past, not dead-lettered or counted twice.
    for offset, (key, value, headers) in enumerate(forged):
        sink._control(windows, offset, key, value, headers)
    assert sink.control_rejected == len(forged) and len(windows.invalid) == len(forged)
    # Genuine records for partition 1 are obeyed.
    n = len(forged)
    sink._control(windows, n, SHED_KEY, shed, control_headers(SECRET, TOPIC, 1, SHED_KEY, shed))
    assert windows.routes["victim"].mode == "drop"
    good_tick = orjson.dumps({"watermark": 1_700_000_000.0})
    sink._control(windows, n + 1, TICK_KEY, good_tick, control_headers(SECRET, TOPIC, 1, TICK_KEY, good_tick))
    assert windows.watermark == 1_700_000_000.0
    assert sink.control_rejected == len(forged)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=8,
)


def _dumps(value: Any) -> bytes:
    # The standard library writes what orjson would refuse to: huge ints, lone surrogates.
    return json.dumps(value).encode()


control_bodies = st.one_of(
    st.binary(max_size=64),
    json_values.map(_dumps),
    st.fixed_dictionaries(
        {"watermark": json_values, "project_id": json_values, "mode": json_values, "fraction": json_values}
    ).map(_dumps),
)
headers_strategy = st.one_of(
    st.none(),
    st.lists(st.tuples(st.sampled_from([CONTROL_SIG_HEADER, "x"]), st.binary(max_size=70)), max_size=3),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=st.one_of(st.sampled_from([TICK_KEY, SHED_KEY]), st.binary(max_size=8).map(lambda b: b"\x00" + b)),
    value=st.one_of(st.none(), control_bodies),
    headers=headers_strategy,
)
def test_control_never_raises_and_never_obeys_unsigned(key: bytes, value: bytes | None, headers: Any) -> None:
    sink, windows = new_sink(), new_windows()
    sink._control(windows, 0, key, value, headers)
    assert windows.watermark == float("-inf") and dict(windows.routes) == {}
    assert windows.read_offset == 1
    assert len(windows.invalid) == 1 and sink.control_rejected == 1
    (item,) = windows.invalid  # the dead letter the sink will write can be encoded, whatever the bytes
    letter = orjson.loads(invalid_record_value(item.reason, topic=TOPIC, partition=1, offset=0, key=key, value=value))
    assert letter["reason"].startswith("control record") and letter["offset"] == 0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from([TICK_KEY, SHED_KEY]), value=st.one_of(st.none(), control_bodies))
def test_control_never_raises_on_signed_garbage(key: bytes, value: bytes | None) -> None:
    """A record the worker signed but cannot understand (a bug, never a tenant) is still never fatal."""
    sink, windows = new_sink(), new_windows()
    sink._control(windows, 0, key, value, control_headers(SECRET, TOPIC, 1, key, value or b""))
    assert windows.read_offset == 1
    meaning = parse_control(key, value)
    assert (len(windows.invalid) == 0) == isinstance(meaning, Tick | ShedMarker)


# ------------------------------------------------------------------ real worker
FAST = {"window_seconds": 2, "allowed_lateness_seconds": 1, "idle_flush_seconds": 1}


def _json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read()
    return json.loads(body) if url.endswith("/") else body.decode()


@pytest.mark.integration
def test_forged_control_records_are_refused_counted_and_dead_lettered(
    broker, s3_client, bucket, worker_env, start_worker
) -> None:
    env = worker_env(**FAST)
    worker = start_worker(env)
    topic = env["STREAMAPP_EVENTS_TOPIC"]
    assert env["STREAMAPP_CONTROL_SECRET"] == CONTROL_SECRET
    drop_victim = orjson.dumps({"project_id": "victim", "mode": "drop", "fraction": 0})
    pin = orjson.dumps({"watermark": 1e12})
    genuine_for_0 = control_headers(CONTROL_SECRET.encode(), topic, 0, SHED_KEY, drop_victim)
    per_partition = [
        (SHED_KEY, drop_victim, None),  # no signature
        (TICK_KEY, pin, None),
        (SHED_KEY, drop_victim, control_headers(b"guessed-secret", topic, 0, SHED_KEY, drop_victim)),
    ]
    events_per_project = 150

    async def run() -> tuple[int, list[dict[str, Any]]]:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        await producer.start()
        forged = 0
        try:
            for partition in range(4):
                for key, value, headers in per_partition:
                    await producer.send_and_wait(topic, value, key=key, partition=partition, headers=headers)
                    forged += 1
                if partition:  # a genuine partition-0 marker copied into another partition
                    await producer.send_and_wait(
                        topic, drop_victim, key=SHED_KEY, partition=partition, headers=genuine_for_0
                    )
                    forged += 1
            for n in range(events_per_project):
                now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"
                for project in ("victim", "honest"):
                    body = {"project_id": project, "collection": "c", "event": {"n": n, "keen": {"timestamp": now}}}
                    await producer.send(topic, orjson.dumps(body), key=project.encode())
                if n % 50 == 49:
                    await producer.flush()
                    await asyncio.sleep(0.5)  # events spread over several windows
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            f"{topic}-invalid", bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        dead: list[dict[str, Any]] = []
        try:
            deadline = time.monotonic() + 60
            while len(dead) < forged and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    dead.extend(orjson.loads(r.value) for r in records)
            await asyncio.sleep(2)  # anything dead-lettered twice would show now
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                dead.extend(orjson.loads(r.value) for r in records)
        finally:
            await consumer.stop()
        return forged, dead

    forged, dead = asyncio.run(run())
    assert len(dead) == forged == 4 * 3 + 3, [d["reason"] for d in dead]
    assert Counter(d["key"] for d in dead) == {"\x00shed": 4 * 2 + 3, "\x00tick": 4}
    assert all(d["topic"] == topic and "control record" in d["reason"] for d in dead)
    assert sum("without" in d["reason"] for d in dead) == 8
    assert sum("bad signature" in d["reason"] for d in dead) == 7
    assert {d["value"] for d in dead} == {drop_victim.decode(), pin.decode()}

    # Not obeyed: every victim event in S3 exactly once, and none of the later events is late.
    want = Counter({(p, n): 1 for p in ("victim", "honest") for n in range(events_per_project)})

    def exported() -> Counter[tuple[str, Any]]:
        got: Counter[tuple[str, Any]] = Counter()
        for key, events in read_objects(s3_client, bucket, "events/").items():
            for event in events:
                got[(key.split("/")[1], event["n"])] += 1
        return got

    # The last window closes only on the worker's own (signed) idle tick: this also shows ticks work.
    wait_until(lambda: sum(exported().values()) >= sum(want.values()), 60, what="every event in S3")
    time.sleep(1.5)
    assert exported() == want
    data_keys = [k for k in list_keys(s3_client, bucket, "events/") if k.endswith(".json.gz")]
    assert data_keys and not [k for k in data_keys if "-late" in k], "a forged tick made events late"
    sink = _json(f"{worker.web_url}/sink/")
    assert sink["control_rejected"] == forged
    metrics = _json(f"{worker.web_url}/metrics")
    assert f"streamapp_control_records_rejected_total {float(forged)}" in metrics
    assert worker.is_running()


def test_a_worker_without_the_secret_refuses_to_start(tmp_path: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMAPP_")}
    env["STREAMAPP_DATA_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "streamapp", "worker"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "STREAMAPP_CONTROL_SECRET is not set" in result.stderr
