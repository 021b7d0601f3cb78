"""Local state and the dev stack (issue 9, item 9), with real processes.

One scenario, as a developer meets it: ``streamapp dev`` runs, its worker dies, so dev exits
non-zero with the worker's log tail. The developer starts again on a new (empty, in-memory)
broker with the same data dir, through ``faust -A streamapp.app worker --datadir D``: the local
RocksDB stores are ahead of the new changelogs (stock Faust: ``ConsistencyError``, every start).
The worker logs one line, rebuilds those partitions from the changelog, and works.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from streamapp.app import data_dir
from streamapp.dev import PROJECT_ROOT, BrokerProcess, S3Process, WorkerProcess, free_port, produce_load, settings_env
from streamapp.infra.local_state import stale_partitions
from streamapp.settings import Settings
from tests.conftest import CONTROL_SECRET
from tests.helpers import event_counts, read_objects, wait_until

pytestmark = pytest.mark.integration


def test_data_dir_explicit_setting_wins_over_faust_datadir() -> None:
    settings = Settings()
    assert data_dir(settings, {"F_DATADIR": "/d"}) == "/d"
    assert data_dir(settings, {"FAUST_DATADIR": "/d"}) == "/d"
    assert data_dir(settings, {"F_DATADIR": "/d", "STREAMAPP_DATA_DIR": "./data"}) == "./data"
    assert data_dir(settings.replace(data_dir="/mine"), {"F_DATADIR": "/d"}) == "/mine"
    assert data_dir(settings, {}) == "./data"


def test_stale_partitions_rule() -> None:
    from faust.types import TP

    a, b, c, d = (TP("t", p) for p in range(4))
    got = stale_partitions({a: 5, b: 5, c: 4, d: 0}, {a: 2, b: 5, c: 5, d: 0})
    assert got == {a: (5, 2), b: (5, 5), d: (0, 0)}  # c applied offset 4 of 5 records: consistent
    assert stale_partitions({a: None, b: 3}, {a: 0, b: None}) == {}


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


async def _tombstones(bootstrap: str, topics: list[str], partitions: int = 4) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for topic in topics:
            for partition in range(partitions):
                for _ in range(2):  # Faust compares with the last offset (1), and 0 would pass as "unknown"
                    await producer.send_and_wait(topic, None, key=b"\x00stale-state-test", partition=partition)
    finally:
        await producer.stop()


def test_dev_exits_when_its_worker_dies_and_stale_local_state_is_rebuilt(
    tmp_path: Path, s3: S3Process, s3_client: Any, bucket: str
) -> None:
    # --- life 1: `streamapp dev`, whose worker is killed
    info_file, data = tmp_path / "info.json", tmp_path / "dev"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMAPP_")}
    env |= {"STREAMAPP_IDLE_FLUSH_SECONDS": "1"}
    command = [
        sys.executable, "-m", "streamapp", "dev", "--kafka-port", str(free_port()), "--s3-port", str(free_port()),
        "--web-port", str(free_port()), "--duration", "300", "--info-file", str(info_file),
        "--data-dir", str(data), "--window-seconds", "1",
    ]  # fmt: skip
    dev = subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_until(info_file.exists, 60, what="the info file")
        info = json.loads(info_file.read_text())
        wait_until(lambda: _ok(f"{info['web']}/readyz"), 90, what="the dev worker ready")
        # Traffic, so the meter's tables write rows (and changelog records) for a few seconds.
        asyncio.run(produce_load(info["kafka"], "events", rate=300, projects=[f"p{i}" for i in range(8)], duration=3))
        time.sleep(1)  # the last rows reach RocksDB and the changelog
        os.kill(info["pids"]["worker"], signal.SIGKILL)
        output, _ = dev.communicate(timeout=60)
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
    assert dev.returncode == 1, output[-3000:]
    assert "the worker exited with code -9; log tail" in output, output[-3000:]
    assert "sink partition" in output.split("log tail", 1)[1], "the tail of the worker's own log follows"

    # --- life 2: a new broker, the same data dir, through Faust's own CLI and --datadir
    worker_dir = data / "worker"
    tables = worker_dir / "v1" / "tables"
    stores = sorted({p.name.rsplit("-", 1)[0] for p in tables.glob("*.db")})
    assert stores, f"no table stores in {tables}"
    port = free_port()
    with BrokerProcess(log_dir=tmp_path / "broker-2") as broker:
        # Each changelog on the new broker holds two records: behind every store that applied more.
        asyncio.run(_tombstones(broker.bootstrap, [f"streamapp-{name}-changelog" for name in stores]))
        settings = settings_env(
            kafka_bootstrap=broker.bootstrap,
            s3_endpoint_url=s3.endpoint_url,
            s3_bucket=bucket,
            control_secret=CONTROL_SECRET,
            web_port=port,
            window_seconds=1,
            allowed_lateness_seconds=1,
            idle_flush_seconds=1,
        )
        # The command, with --datadir after `worker` (Faust itself takes it only before).
        faust = [sys.executable, "-m", "faust", "-A", "streamapp.app", "worker", "--datadir", str(worker_dir)]
        worker = WorkerProcess(settings, tmp_path / "logs", command=[*faust, "--web-port", str(port)])
        assert "STREAMAPP_DATA_DIR" not in worker.environment()
        worker.start()
        try:
            worker.wait_ready(90)
            sent = asyncio.run(produce_load(broker.bootstrap, "events", rate=100, projects=["after"], duration=1.5))
            want = {("after", n): 1 for n in range(sent["after"])}
            wait_until(lambda: event_counts(read_objects(s3_client, bucket, "events/")) == want, 60, what="export")
            log = worker.log_path.read_text()
        finally:
            worker.stop()
    rebuilt = [line for line in log.splitlines() if "is ahead of its changelog" in line]
    assert len(rebuilt) == 1, log[-4000:]
    assert str(tables) in rebuilt[0], "the data dir given by --datadir is the one in use"
    assert "rebuilding them from the changelog" in rebuilt[0]
    # Each partition listed is one stock Faust refuses: applied >= end, with end - 1 > 0 (it
    # compares with the last offset and reads 0 as "unknown", hence the two records above).
    assert re.search(r"meter-rates-changelog\[\d\] applied \d+ >= end 2", rebuilt[0]), rebuilt[0]
    assert "ConsistencyError" not in log and "Traceback" not in log
    assert not (PROJECT_ROOT / "data").exists() or (PROJECT_ROOT / "data").stat().st_mtime < time.time() - 600


def test_reset_local_state_deletes_the_table_stores(tmp_path: Path) -> None:
    from streamapp.infra.local_state import reset_local_state

    tables = tmp_path / "v1" / "tables"
    (tables / "meter-rates-0.db").mkdir(parents=True)
    (tables / "meter-rates-0.db" / "CURRENT").write_text("x")
    assert reset_local_state(tables) is True
    assert not tables.exists() and (tmp_path / "v1").exists()
    assert reset_local_state(tables) is False
