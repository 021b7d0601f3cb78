"""Every Kafka compression codec is read; a batch that cannot be decoded stops only its partition.

The end-to-end test runs two real workers of one app, one after the other. The first has snappy
switched off (a sitecustomize shim makes ``aiokafka.codec.has_snappy`` false, exactly what a
missing codec library looks like, cf. issue 9's ``UnsupportedCodecError``). Producers with
gzip, lz4, zstd and snappy each write to their own partition. The first worker exports the
gzip, lz4 and zstd partitions, and stops the snappy partition at its first snappy batch with
one error on /healthz, /sink/ and the log, and keeps running. The second (normal) worker then
exports everything, and every event is in S3 exactly once: nothing was skipped.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import urllib.request
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.consumer.fetcher import PartitionRecords
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition

from streamapp.app import create_app
from streamapp.infra.transport import ISOLATION_LEVEL, GuardedFetchResults, StreamappConsumerThread
from streamapp.settings import Settings
from streamapp.sink.views import merge_sink
from tests.helpers import read_objects, wait_until

CODEC_OF_PARTITION = {0: "gzip", 1: "lz4", 2: "zstd", 3: "snappy"}
PER_CODEC = 200
BEFORE_SNAPPY = 40  # gzip events written to the snappy partition before its snappy batches


async def test_worker_consumer_reads_committed_only() -> None:
    """Records of aborted transactions are never delivered. Tansu has no transactions: pinned here."""
    app = create_app(Settings(control_secret="x", app_id="isolation-pin", kafka_bootstrap="127.0.0.1:1"))
    thread = app.consumer._thread  # type: ignore[attr-defined]
    assert isinstance(thread, StreamappConsumerThread)
    client = thread._create_worker_consumer(app.transport)
    assert ISOLATION_LEVEL == "read_committed"
    assert client._isolation_level == "read_committed"  # what aiokafka gives its Fetcher in start()


def _batch(codec: int, base_offset: int, values: list[bytes]) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=codec,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for i, value in enumerate(values):
        builder.append(i, timestamp=1000, key=b"k", value=value, headers=[])
    data = bytearray(builder.build())
    struct.pack_into(">q", data, 0, base_offset)  # a batch's first 8 bytes: its base offset
    return bytes(data)


def test_an_undecodable_batch_ends_its_partitions_records_at_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the transport relies on inside aiokafka (pinned here, so an upgrade that moves it fails)."""
    import aiokafka.codec

    tp = TopicPartition("events", 3)
    data = _batch(1, 0, [b"a", b"b", b"c"]) + _batch(2, 3, [b"d", b"e"]) + _batch(1, 5, [b"f"])  # gzip, snappy, gzip
    monkeypatch.setattr(aiokafka.codec, "has_snappy", lambda: False)  # this process now lacks snappy
    records = PartitionRecords(tp, MemoryRecords(data), [], 0, None, None, True, ISOLATION_LEVEL)
    errors: list[tuple[Any, int, BaseException]] = []
    fetched = GuardedFetchResults({}, lambda *error: errors.append(error))
    fetched[tp] = SimpleNamespace(_partition_records=records)  # what Fetcher stores: a FetchResult
    assert [r.value for r in records] == [b"a", b"b", b"c"]
    assert records.next_fetch_offset == 3, "aiokafka's position stays at the batch: nothing is skipped"
    ((where, offset, exc),) = errors
    assert (where, offset) == (tp, 3) and "snappy" in str(exc)


def test_cluster_sink_view_lists_every_workers_stopped_partitions() -> None:
    a, b = {"topic": "e", "partition": 1, "offset": 5}, {"topic": "e", "partition": 3, "offset": 9}
    merged = merge_sink([{"stopped_partitions": [a]}, {"stopped_partitions": []}, {"stopped_partitions": [b]}])
    assert merged["stopped_partitions"] == [a, b]


def _get(url: str) -> tuple[int, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, json.loads(response.read())


def _exported(s3_client: Any, bucket: str) -> Counter[tuple[str, int]]:
    got: Counter[tuple[str, int]] = Counter()
    for events in read_objects(s3_client, bucket, "events/").values():
        for event in events:
            got[(event["codec"], event["n"])] += 1
    return got


@pytest.mark.integration
def test_every_codec_is_read_and_an_undecodable_batch_stops_only_its_partition(
    broker, s3_client, bucket, worker_env, start_worker, tmp_path: Path
) -> None:
    shim = tmp_path / "no-snappy"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import aiokafka.codec\naiokafka.codec.has_snappy = lambda: False\n")
    env = worker_env(window_seconds=1, allowed_lateness_seconds=1, idle_flush_seconds=1)
    topic = env["STREAMAPP_EVENTS_TOPIC"]
    crippled = start_worker(env, extra_env={"PYTHONPATH": str(shim)})

    async def produce() -> None:
        async def send(codec: str, partition: int, numbers: range) -> None:
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, compression_type=codec, linger_ms=20)
            await producer.start()
            try:
                for n in numbers:
                    now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"
                    event = {"codec": codec if n >= 0 else "gzip", "n": n, "keen": {"timestamp": now}}
                    project = f"codec-{partition}"
                    body = {"project_id": project, "collection": "c", "event": event}
                    await producer.send(topic, orjson.dumps(body), key=project.encode(), partition=partition)
            finally:
                await producer.stop()  # flushes

        # The snappy partition starts with gzip events (negative n), which must be delivered.
        await send("gzip", 3, range(-BEFORE_SNAPPY, 0))
        await asyncio.gather(*(send(codec, p, range(PER_CODEC)) for p, codec in CODEC_OF_PARTITION.items()))

    asyncio.run(produce())
    readable = Counter({(codec, n): 1 for codec in ("gzip", "lz4", "zstd") for n in range(PER_CODEC)})

    def stopped() -> Any:
        status, body = _get(f"{crippled.web_url}/healthz")
        return body if status == 200 and body["status"] == "degraded" else None

    health = wait_until(stopped, 60, what="/healthz to report the stopped partition")
    ((stop,),) = [health["stopped"]]
    assert (stop["topic"], stop["partition"], stop["offset"]) == (topic, 3, BEFORE_SNAPPY)
    assert "snappy" in stop["error"] and health["errors"] == [stop["error"]]
    wait_until(
        lambda: _exported(s3_client, bucket) == readable, 60, what="gzip, lz4 and zstd exported by the first worker"
    )
    _, sink = _get(f"{crippled.web_url}/sink/")
    assert sink["stopped_partitions"] == [stop]
    # Everything before the batch was read, nothing after it: the partition waits at the batch.
    assert sink["partitions"]["3"]["read_offset"] == BEFORE_SNAPPY
    assert sink["partitions"]["3"]["committed_offset"] <= BEFORE_SNAPPY
    time.sleep(2)  # fetches of other partitions went on meanwhile; the stopped one stays stopped
    assert crippled.is_running(), "one partition's batch must not stop the worker"
    log = crippled.log_path.read_text()
    assert log.count("cannot decode the record batch") == 1, "one clear error, not one per fetch"
    assert "Traceback" not in log
    crippled.stop()

    # A worker that has the codec resumes the partition where it stopped: all exactly once.
    healthy = start_worker(env)
    everything = readable + Counter({("snappy", n): 1 for n in range(PER_CODEC)})
    everything += Counter({("gzip", n): 1 for n in range(-BEFORE_SNAPPY, 0)})
    wait_until(lambda: sum(_exported(s3_client, bucket).values()) >= sum(everything.values()), 60, what="all in S3")
    time.sleep(1.5)
    assert _exported(s3_client, bucket) == everything
    assert _get(f"{healthy.web_url}/healthz")[1]["status"] == "ok"
