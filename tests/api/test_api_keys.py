"""Write keys: stored only as hashes, shown once, rotated with a grace period, revoked; an unknown
project and a wrong key answer alike. One worker for the module (real broker, real worker)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from streamapp.cli import main as cli_main
from streamapp.control import ControlView, ProjectSettings, hash_key, project_record, publish_records
from streamapp.dev import BrokerProcess, S3Process, WorkerProcess
from streamapp.web.auth import key_matches
from tests.api_helpers import admin, create_project, module_worker, topic_values, write

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def worker(
    broker: BrokerProcess, s3: S3Process, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, dict[str, object]]]:
    with module_worker(broker, s3, tmp_path_factory.mktemp("keys")) as started:
        yield started


def control_topic(env: dict[str, object]) -> str:
    return f"{env['events_topic']}-control"


def cli_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, object]) -> None:
    monkeypatch.setenv("STREAMAPP_KAFKA_BOOTSTRAP", str(env["kafka_bootstrap"]))
    monkeypatch.setenv("STREAMAPP_EVENTS_TOPIC", str(env["events_topic"]))


def eventually(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


# --------------------------------------------------------------------------- pure


def test_key_matches_current_and_previous_within_grace_only() -> None:
    project = ProjectSettings("p", key_hash=hash_key("new"), previous_key_hash=hash_key("old"))
    project.previous_key_expires_at = 100.0
    assert key_matches(project, "new", 99.0) and key_matches(project, "new", 1e12)
    assert key_matches(project, "old", 99.0) and not key_matches(project, "old", 100.0)
    assert not key_matches(project, "other", 0.0) and not key_matches(None, "new", 0.0)
    assert not key_matches(ProjectSettings("p"), "", 0.0)  # no key set: nothing matches, not even ""
    malformed = ProjectSettings("p", key_hash=5, previous_key_hash=None)  # type: ignore[arg-type]
    assert not key_matches(malformed, "5", 0.0)  # a forged record reads as "no key", never raises


def test_a_legacy_record_with_a_clear_key_is_hashed_in_the_view() -> None:
    view = ControlView()
    view.apply({"type": "project", "project_id": "old", "write_key": "k" * 64})
    project = view.projects["old"]
    assert project.key_hash == "sha256:" + hashlib.sha256(b"k" * 64).hexdigest()
    assert "k" * 64 not in json.dumps(project_record(project))
    view.apply({"type": "key", "project_id": "old", "key_hash": "", "previous_key_hash": ""})
    assert not key_matches(view.projects["old"], "k" * 64, time.time())


# --------------------------------------------------------------------------- worker


def test_keys_are_hashes_on_the_control_topic_and_never_listed(worker: Any) -> None:
    proc, env = worker
    web = proc.web_url
    key = create_project(web, "hashed")
    assert len(key) == 64
    assert write(web, "hashed", key, {"n": 1}, "clicks").status == 201
    for reply in (admin(web, "GET", "/admin/projects"), admin(web, "GET", "/admin/projects/hashed")):
        assert reply.status == 200, reply
        assert key.encode() not in reply.body and hashlib.sha256(key.encode()).hexdigest().encode() not in reply.body
        assert b'"has_key":true' in reply.body
    values = topic_values(str(env["kafka_bootstrap"]), control_topic(env))
    assert any(b'"hashed"' in v for v in values), "the project record is on the control topic"
    assert not any(key.encode() in v for v in values), "the clear key is on the control topic"
    assert any(hash_key(key).encode() in v for v in values)


def test_unknown_project_and_wrong_key_answer_alike(worker: Any) -> None:
    web = worker[0].web_url
    key = create_project(web, "alike")
    wrong = write(web, "alike", "x" * 64, {"n": 1}, "clicks")
    unknown = write(web, "no-such-project", key, {"n": 1}, "clicks")
    assert (wrong.status, wrong.body) == (unknown.status, unknown.body) == (401, wrong.body), (wrong, unknown)
    batch_wrong = write(web, "alike", "x", {"c": [{}]})
    batch_unknown = write(web, "no-such-project", "x", {"c": [{}]})
    assert (batch_wrong.status, batch_wrong.body) == (batch_unknown.status, batch_unknown.body)
    assert write(web, "alike", key, {"n": 1}, "clicks").status == 201


def test_rotation_keeps_the_old_key_for_the_grace_period_and_revocation_ends_both(worker: Any) -> None:
    web = worker[0].web_url
    old = create_project(web, "rotated")
    reply = admin(web, "POST", "/admin/projects/rotated/key", {"grace_seconds": 4})
    assert reply.status == 200 and reply.json()["replicated"] is True, reply
    new = reply.json()["write_key"]
    assert new != old and len(new) == 64
    assert write(web, "rotated", new, {"n": 1}, "clicks").status == 201
    assert write(web, "rotated", old, {"n": 2}, "clicks").status == 201  # within the grace period
    listed = admin(web, "GET", "/admin/projects/rotated")
    assert new.encode() not in listed.body and listed.json()["previous_key_expires_at"] > time.time()
    eventually(lambda: write(web, "rotated", old, {"n": 3}, "clicks").status == 401, timeout=15)
    assert write(web, "rotated", new, {"n": 4}, "clicks").status == 201

    # Rotation without grace: the old key ends at once.
    newer = admin(web, "POST", "/admin/projects/rotated/key", {"grace_seconds": 0}).json()["write_key"]
    assert write(web, "rotated", new, {"n": 5}, "clicks").status == 401
    assert write(web, "rotated", newer, {"n": 6}, "clicks").status == 201

    # Revocation ends the current key and one still in its grace period.
    newest = admin(web, "POST", "/admin/projects/rotated/key", {"grace_seconds": 3600}).json()["write_key"]
    reply = admin(web, "DELETE", "/admin/projects/rotated/key")
    assert reply.status == 200 and reply.json()["replicated"] is True, reply
    assert write(web, "rotated", newest, {"n": 7}, "clicks").status == 401
    assert write(web, "rotated", newer, {"n": 8}, "clicks").status == 401
    assert admin(web, "GET", "/admin/projects/rotated").json()["has_key"] is False
    # Bad requests: unknown project, bad grace.
    assert admin(web, "POST", "/admin/projects/nope/key", {}).status == 404
    assert admin(web, "POST", "/admin/projects/rotated/key", {"grace_seconds": -1}).status == 400
    assert admin(web, "POST", "/admin/projects/rotated/key", {"grace_seconds": "1"}).status == 400
    # A revoked project can be given a key again by rotating; creating it again stays a 409.
    assert admin(web, "POST", "/admin/projects", {"project_id": "rotated"}).status == 409
    again = admin(web, "POST", "/admin/projects/rotated/key", {"grace_seconds": 0}).json()["write_key"]
    assert write(web, "rotated", again, {"n": 9}, "clicks").status == 201


def test_cli_project_commands_through_the_control_topic(
    worker: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    proc, env = worker
    web = proc.web_url
    cli_env(monkeypatch, env)
    assert cli_main(["project", "create", "cli-keys"]) == 0
    key = json.loads(capsys.readouterr().out)["write_key"]
    eventually(lambda: write(web, "cli-keys", key, {"n": 1}, "clicks").status == 201)

    assert cli_main(["project", "rotate-key", "cli-keys", "--grace", "0"]) == 0
    rotated = json.loads(capsys.readouterr().out)["write_key"]
    eventually(lambda: write(web, "cli-keys", rotated, {"n": 2}, "clicks").status == 201)
    assert write(web, "cli-keys", key, {"n": 3}, "clicks").status == 401

    assert cli_main(["project", "list"]) == 0
    table = capsys.readouterr().out
    assert "cli-keys" in table and rotated not in table and key not in table

    assert cli_main(["project", "revoke-key", "cli-keys"]) == 0
    capsys.readouterr()
    eventually(lambda: write(web, "cli-keys", rotated, {"n": 4}, "clicks").status == 401)
    # --web goes through the admin API: the same commands.
    base = ["--web", web, "--token", "admin-tok-3f1c9e"]
    assert cli_main(["project", "rotate-key", "cli-keys", "--grace", "0", *base]) == 0
    via_web = json.loads(capsys.readouterr().out)["write_key"]
    assert write(web, "cli-keys", via_web, {"n": 5}, "clicks").status == 201
    assert cli_main(["project", "revoke-key", "cli-keys", *base]) == 0
    assert write(web, "cli-keys", via_web, {"n": 6}, "clicks").status == 401

    values = topic_values(str(env["kafka_bootstrap"]), control_topic(env))
    assert not any(k.encode() in v for v in values for k in (key, rotated, via_web))


def test_a_project_published_with_a_clear_key_before_hashing_keeps_working(worker: Any) -> None:
    proc, env = worker
    legacy = {"type": "project", "project_id": "legacy", "write_key": "l" * 64, "s3_streaming": True}
    asyncio.run(publish_records(str(env["kafka_bootstrap"]), control_topic(env), [legacy]))
    web = proc.web_url
    eventually(lambda: write(web, "legacy", "l" * 64, {"n": 1}, "clicks").status == 201)
    assert b"l" * 64 not in admin(web, "GET", "/admin/projects").body
