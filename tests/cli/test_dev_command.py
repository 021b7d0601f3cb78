"""`streamapp dev`: the embedded stack as a newcomer runs it, stopped by --duration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from streamapp.dev import free_port, s3_client
from tests.helpers import event_counts, read_objects, wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_dev_runs_the_stack_exports_produced_events_and_stops_cleanly(tmp_path: Path) -> None:
    info_file = tmp_path / "info.json"
    kafka_port, s3_port, web_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMAPP_")}
    env |= {"STREAMAPP_ALLOWED_LATENESS_SECONDS": "1", "STREAMAPP_IDLE_FLUSH_SECONDS": "1"}
    command = [
        sys.executable, "-m", "streamapp", "dev",
        "--kafka-port", str(kafka_port), "--s3-port", str(s3_port), "--web-port", str(web_port),
        "--duration", "40", "--info-file", str(info_file), "--window-seconds", "1",
        "--data-dir", str(tmp_path / "dev"),
    ]  # fmt: skip
    dev = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(info_file.exists, 90, what="the info file")  # broker, S3 server, worker spawned
        info = json.loads(info_file.read_text())
        assert info["kafka"] == f"127.0.0.1:{kafka_port}"
        assert info["s3_endpoint_url"] == f"http://127.0.0.1:{s3_port}"
        assert info["web"] == f"http://127.0.0.1:{web_port}"
        assert info["admin_token"]
        wait_until(lambda: _ok(f"{info['web']}/healthz"), 60, what="the worker's web server")
        produce_env = env | {"STREAMAPP_KAFKA_BOOTSTRAP": info["kafka"]}
        out = subprocess.run(
            [sys.executable, "-m", "streamapp", "produce", "--rate", "400", "--projects", "4", "--duration", "3"],
            cwd=ROOT, env=produce_env, capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        sent = json.loads(out.stdout.strip().splitlines()[-1])
        want = sum(sent.values())
        assert want >= 1000
        client = s3_client(info["s3_endpoint_url"])
        got = wait_until(
            lambda: (lambda c: c if sum(c.values()) >= want else None)(
                event_counts(read_objects(client, info["bucket"], "events/"))
            ),
            60,
            what="the produced events in S3",
        )
        assert got == {(p, n): 1 for p, count in sent.items() for n in range(count)}
        output, _ = dev.communicate(timeout=90)
    finally:
        if dev.poll() is None:
            dev.kill()
    assert dev.returncode == 0, output[-3000:]
    assert "[status]" in output
    time.sleep(0.5)
    assert [name for name, pid in info["pids"].items() if _alive(pid)] == []


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
