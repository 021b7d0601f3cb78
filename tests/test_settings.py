"""Settings: typed, validated, documented, isolated from Faust's own environment variables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streamapp.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent


def test_reads_and_types_environment_variables() -> None:
    settings = Settings.from_env(
        {
            "STREAMAPP_WINDOW_SECONDS": "60",
            "STREAMAPP_S3_STREAMING_DEFAULT": "false",
            "STREAMAPP_BURST_TOLERANCE": "0.25",
        }
    )
    assert settings.window_seconds == 60
    assert settings.s3_streaming_default is False
    assert settings.burst_tolerance == 0.25
    assert settings.events_topic == "events"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("STREAMAPP_WINDOW_SECONDS", "five", "expected int"),
        ("STREAMAPP_WINDOW_SECONDS", "0", "must be > 0"),
        ("STREAMAPP_SHED_MODE", "explode", "divert, drop or shadow"),
        ("STREAMAPP_KAFKA_BOOTSTRAP", "nohost", "host:port"),
        ("STREAMAPP_S3_STREAMING_DEFAULT", "maybe", "expected bool"),
        ("STREAMAPP_DRAIN_PROCESSES", "-1", "must be 0-64"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env({variable: value})
    assert variable in str(error.value)
    assert message in str(error.value)


def test_readme_documents_every_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name, _, _ in Settings.documentation() if f"`{name}`" not in readme]
    assert missing == []


def test_a_stray_faust_variable_does_not_change_the_app() -> None:
    code = "from streamapp.app import app; print(app.conf.web_port, app.conf.broker[0].scheme)"
    env = {
        "PATH": "/usr/bin:/bin",
        "WEB_PORT": "1234",
        "BROKER_URL": "kafka://elsewhere:1",
        "STREAMAPP_WEB_PORT": "7001",
    }
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert out.stdout.split() == ["7001", "streamapp"]


def test_worker_refuses_to_start_with_a_bad_variable() -> None:
    env = {"PATH": "/usr/bin:/bin", "STREAMAPP_WINDOW_SECONDS": "-3"}
    out = subprocess.run(
        [sys.executable, "-m", "streamapp", "worker"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.returncode == 2
    assert "STREAMAPP_WINDOW_SECONDS='-3'" in out.stderr or "STREAMAPP_WINDOW_SECONDS=-3" in out.stderr
