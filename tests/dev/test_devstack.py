"""The embedded dev stack really starts, serves Kafka and S3, pauses, and cleans up after itself."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamapp.dev import (
    BrokerProcess,
    DevStack,
    DevStackError,
    S3Process,
    WorkerProcess,
    s3_client,
    settings_env,
)

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting for init to reap it) per /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def _gone(pid: int, within: float = 3.0) -> bool:
    """Neither the process nor any member of its process group is still running.

    Killed grandchildren are reparented to init and stay zombies for a moment: they count as gone.
    """
    deadline = time.monotonic() + within
    while _alive(pid) or _group_members(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A private broker, for tests that pause or stop it (the session one is shared)."""
    proc = BrokerProcess(log_dir=tmp_path)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def occupied_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def test_broker_produce_consume_round_trip(broker: BrokerProcess, unique_name: str) -> None:
    topic = f"{unique_name}-roundtrip"
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        for i in range(3):
            await producer.send_and_wait(topic, f"value-{i}".encode(), key=b"k")
    finally:
        await producer.stop()

    # No group: a group join costs seconds and is not what this test is about.
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(r.value for r in records if r.value is not None)
    finally:
        await consumer.stop()
    assert got == [b"value-0", b"value-1", b"value-2"]


def test_s3_put_get(s3_client: Any, bucket: str) -> None:
    s3_client.put_object(Bucket=bucket, Key="a/b.json", Body=b'{"x": 1}')
    assert s3_client.get_object(Bucket=bucket, Key="a/b.json")["Body"].read() == b'{"x": 1}'
    listed = s3_client.list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in listed] == ["a/b.json"]


async def test_broker_pause_times_out_and_resume_recovers(own_broker: BrokerProcess) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=own_broker.bootstrap, request_timeout_ms=3000)
    await producer.start()
    try:
        await producer.send_and_wait("paused", b"before")  # topic and metadata exist before the pause
        own_broker.pause()
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(producer.send_and_wait("paused", b"during"), 1.0)
        finally:
            own_broker.resume()
        await asyncio.wait_for(producer.send_and_wait("paused", b"after"), 10)
    finally:
        await producer.stop()


def test_broker_stop_leaves_no_process(tmp_path: Path) -> None:
    proc = BrokerProcess(log_dir=tmp_path)
    proc.start()
    pid = proc.pid
    assert proc.is_running()
    proc.stop()
    assert _gone(pid)
    assert not proc.is_running()


def test_children_die_with_a_killed_parent(tmp_path: Path) -> None:
    # The parent gets no chance to call stop(): PR_SET_PDEATHSIG must end the servers.
    script = (
        "import sys, time\n"
        "from streamapp.dev import BrokerProcess, S3Process\n"
        f"b = BrokerProcess(log_dir={str(tmp_path)!r}); b.start()\n"
        f"s = S3Process(log_dir={str(tmp_path)!r}); s.start()\n"
        "print(b.pid, s.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
    assert all(_gone(p) for p in pids)


def test_broker_stop_while_paused(tmp_path: Path) -> None:
    # A SIGSTOPped process ignores SIGTERM until continued; stop() must still end it promptly.
    proc = BrokerProcess(log_dir=tmp_path)
    proc.start()
    pid = proc.pid
    proc.pause()
    started = time.monotonic()
    proc.stop()
    assert _gone(pid)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("kind", [BrokerProcess, S3Process])
def test_start_fails_with_log_tail_on_taken_port(
    tmp_path: Path, occupied_port: int, kind: type[BrokerProcess | S3Process]
) -> None:
    proc = kind(port=occupied_port, log_dir=tmp_path)
    with pytest.raises(DevStackError, match=f"(?s)port {occupied_port} is in use.*log tail"):
        proc.start(timeout=10)
    assert not proc.is_running()


@pytest.mark.parametrize("kind", [BrokerProcess, S3Process])
def test_auto_port_retries_when_port_was_taken(
    tmp_path: Path, occupied_port: int, kind: type[BrokerProcess | S3Process]
) -> None:
    # Simulates losing the free_port() race: the chosen port is grabbed before the server binds it.
    proc = kind(log_dir=tmp_path)
    proc.port = occupied_port
    with proc:
        assert proc.port != occupied_port
        assert proc.is_running()


def test_s3_pause_keeps_data_stop_restarts_on_same_port(tmp_path: Path) -> None:
    proc = S3Process(log_dir=tmp_path)
    with proc:
        endpoint = proc.endpoint_url
        proc.create_bucket("outage")
        fast = s3_client(endpoint, timeout=0.5, retries=1)
        fast.put_object(Bucket="outage", Key="k", Body=b"v")

        proc.pause()
        try:
            with pytest.raises(botocore.exceptions.ReadTimeoutError):
                fast.get_object(Bucket="outage", Key="k")
        finally:
            proc.resume()
        assert fast.get_object(Bucket="outage", Key="k")["Body"].read() == b"v"

        pid = proc.pid
        proc.stop()
        assert _gone(pid)
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            fast.list_buckets()

        proc.start()  # same port, empty server
        assert proc.endpoint_url == endpoint
        assert fast.list_buckets()["Buckets"] == []


def test_devstack_starts_broker_s3_and_bucket(tmp_path: Path) -> None:
    with DevStack(tmp_path, bucket="dev-bucket") as stack:
        env = stack.env(web_port=1234)
        assert env["STREAMAPP_KAFKA_BOOTSTRAP"] == stack.kafka_bootstrap
        assert env["STREAMAPP_S3_ENDPOINT_URL"] == stack.s3_endpoint_url
        assert env["STREAMAPP_S3_BUCKET"] == "dev-bucket"
        assert env["STREAMAPP_WEB_PORT"] == "1234"
        names = [b["Name"] for b in s3_client(stack.s3_endpoint_url).list_buckets()["Buckets"]]
        assert names == ["dev-bucket"]
        pids = [stack.broker.pid, stack.s3.pid]
    assert all(_gone(pid) for pid in pids)


def test_settings_env_maps_names_and_rejects_typos() -> None:
    env = settings_env({"STREAMAPP_APP_ID": "a"}, web_port=1, s3_streaming_default=False)
    assert env == {
        "STREAMAPP_APP_ID": "a",
        "STREAMAPP_WEB_PORT": "1",
        "STREAMAPP_S3_STREAMING_DEFAULT": "false",
    }
    with pytest.raises(KeyError, match="web_prot"):
        settings_env(web_prot=1)


# A stand-in for `python -m streamapp worker` (which other files provide): serves /healthz with its
# environment and keeps a grandchild, so the test can check the whole process group is ended.
FAKE_WORKER = textwrap.dedent(
    """
    import http.server, json, os, signal, subprocess, sys
    if os.environ.get("IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"env": dict(os.environ), "child": child.pid}).encode()
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    print("fake worker up", flush=True)
    http.server.HTTPServer(("127.0.0.1", int(os.environ["STREAMAPP_WEB_PORT"])), H).serve_forever()
    """
)


@pytest.mark.parametrize("ignore_term", [False, True])
def test_worker_process_env_readiness_and_group_stop(tmp_path: Path, ignore_term: bool) -> None:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    os.environ["STREAMAPP_LEAKED_FROM_PARENT"] = "x"  # must not reach the child
    try:
        proc = WorkerProcess(
            {"app_id": "fake", "STREAMAPP_S3_BUCKET": "b"},
            tmp_path,
            command=[sys.executable, str(script)],
            extra_env={"IGNORE_TERM": "1"} if ignore_term else {},
        )
        proc.start()
    finally:
        del os.environ["STREAMAPP_LEAKED_FROM_PARENT"]
    try:
        proc.wait_ready(timeout=15)
        with urllib.request.urlopen(f"{proc.web_url}/healthz", timeout=5) as resp:
            info = json.load(resp)
    finally:
        started = time.monotonic()
        proc.stop(timeout=1.0)
    env = info["env"]
    assert env["STREAMAPP_APP_ID"] == "fake"
    assert env["STREAMAPP_S3_BUCKET"] == "b"
    assert env["STREAMAPP_WEB_PORT"] == str(proc.web_port)
    assert env["AWS_ACCESS_KEY_ID"] == "testing" and env["AWS_SECRET_ACCESS_KEY"] == "testing"
    assert "STREAMAPP_LEAKED_FROM_PARENT" not in env
    assert _gone(proc.pid) and _gone(info["child"])
    assert time.monotonic() - started < 5
    assert "fake worker up" in proc.log_tail(5)


def test_worker_wait_ready_reports_early_exit(tmp_path: Path) -> None:
    proc = WorkerProcess({}, tmp_path, command=[sys.executable, "-c", "print('boom'); raise SystemExit(3)"])
    proc.start()
    try:
        with pytest.raises(DevStackError, match=r"(?s)exited with code 3.*boom"):
            proc.wait_ready(timeout=15)
    finally:
        proc.kill()
