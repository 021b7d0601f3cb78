"""docker-compose.yml is valid and wires Kafka, MinIO and scalable workers together.

No Docker engine is needed: ``docker-compose config`` only parses and normalizes the file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(
            "docker-compose is not on PATH; install it (Debian: apt-get install -y docker-compose)",
            pytrace=False,
        )
    # Compose variables of the caller (COMPOSE_FILE, COMPOSE_PROJECT_NAME ...) must not change the result.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    return subprocess.run([exe, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    result = _compose("config")
    assert result.returncode == 0, result.stderr
    parsed = yaml.safe_load(result.stdout)
    assert isinstance(parsed, dict)
    return parsed


def _published(port: Any) -> str | None:
    """Host side of a port entry in short ("127.0.0.1:80:80/tcp", "80") or long ({target, published}) form."""
    if isinstance(port, dict):
        published = port.get("published")
        return None if published in (None, "") else str(published)
    parts = str(port).split("/")[0].split(":")
    return ":".join(parts[:-1]) or None


def test_compose_config_is_valid() -> None:
    result = _compose("config", "-q")
    assert result.returncode == 0, f"docker-compose config -q failed:\n{result.stderr}"


def test_services_exist(config: dict[str, Any]) -> None:
    services = config["services"]
    assert {"kafka", "minio", "worker"} <= set(services)
    assert services["kafka"]["image"] == "apache/kafka:3.9.0"
    assert services["minio"]["image"].startswith("minio/minio")
    # A one-shot minio/mc service creates the bucket the workers export to.
    makers = [
        s
        for s in services.values()
        if str(s.get("image", "")).startswith("minio/mc") and "streamapp-events" in str(s.get("entrypoint"))
    ]
    assert makers, "no minio/mc service creates the streamapp-events bucket"


def test_worker_is_scalable(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    assert "build" in worker
    assert "container_name" not in worker, "a fixed container name prevents --scale"
    fixed = [p for p in worker.get("ports", []) if _published(p)]
    assert not fixed, f"worker publishes fixed host ports {fixed}: --scale worker=3 would collide"
    # State must be per container: no host path or named volume shared by the replicas.
    data_dir = worker["environment"]["STREAMAPP_DATA_DIR"]
    for volume in worker.get("volumes", []):
        target = volume.get("target") if isinstance(volume, dict) else str(volume).split(":")[1]
        assert target != data_dir, f"worker data dir {data_dir} is a shared volume"


def test_worker_points_at_kafka_and_minio(config: dict[str, Any]) -> None:
    services = config["services"]
    env = services["worker"]["environment"]
    minio_env = services["minio"]["environment"]
    assert env["STREAMAPP_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert env["STREAMAPP_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["STREAMAPP_S3_BUCKET"] == "streamapp-events"
    assert env["AWS_ACCESS_KEY_ID"] == minio_env["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio_env["MINIO_ROOT_PASSWORD"]
    assert env["STREAMAPP_WEB_HOST"] == "0.0.0.0"
    assert "INTERNAL://kafka:9092" in services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]


def test_short_and_long_port_forms() -> None:
    assert _published("6066") is None
    assert _published({"target": 6066}) is None
    assert _published("127.0.0.1:29092:29092/tcp") == "127.0.0.1:29092"
    assert _published({"target": 6066, "published": "8080"}) == "8080"
