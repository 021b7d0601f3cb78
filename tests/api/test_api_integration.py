"""The Keen-compatible HTTP API end to end: real worker processes, real Tansu broker, real moto S3."""

from __future__ import annotations

import json
import math
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest

from streamapp.cli import main as cli_main
from tests.api_helpers import topic_entries
from tests.conftest import AppWorker, StartAppWorker
from tests.helpers import read_objects, wait_until

pytestmark = pytest.mark.integration

TOKEN = "t"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
FAST = {
    "admin_token": TOKEN,
    "window_seconds": 1,
    "allowed_lateness_seconds": 1,
    "idle_flush_seconds": 1,
}
KEY_LAYOUT = re.compile(r"^events/(?P<project>[\w-]+)/(?P<ws>[^/]+)/(?P<coll>[\w-]+)/[^/]+\.json\.gz$")


class Reply:
    def __init__(self, status: int, headers: Any, body: bytes, elapsed: float) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.elapsed = elapsed
        self.at = time.time()

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:200]!r}, {self.elapsed * 1000:.1f} ms)"


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 30) -> Reply:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
            return Reply(response.status, response.headers, payload, time.perf_counter() - started)
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        return Reply(exc.code, exc.headers, payload, time.perf_counter() - started)


def create_project(web: str, project_id: str, **settings: Any) -> str:
    reply = http("POST", f"{web}/admin/projects", {"project_id": project_id, **settings}, ADMIN, timeout=60)
    assert reply.status == 201, reply
    assert reply.json()["replicated"] is True
    return str(reply.json()["write_key"])


def record(web: str, project: str, key: str | None, collection: str, event: Any, **kw: Any) -> Reply:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = key
    return http("POST", f"{web}/3.0/projects/{project}/events/{collection}", event, headers, **kw)


def record_batch(web: str, project: str, key: str, body: Any) -> Reply:
    headers = {"Authorization": key, "Content-Type": "application/json"}
    return http("POST", f"{web}/3.0/projects/{project}/events", body, headers)


def exported(s3_client: Any, bucket: str, project: str) -> list[tuple[str, dict[str, Any]]]:
    """(collection, event) of everything the sink wrote for ``project``."""
    out = []
    for key, events in read_objects(s3_client, bucket, f"events/{project}/").items():
        match = KEY_LAYOUT.match(key)
        assert match, key
        out.extend((match["coll"], event) for event in events)
    return out


def topic_records(bootstrap: str, topic: str, key: str) -> list[dict[str, Any]]:
    """Every record value (decoded) on ``topic`` with this key, from the beginning to the end offsets
    at the call (``api_helpers.topic_entries``: the events topic is never quiet, idle ticks go there)."""
    return [orjson.loads(value) for k, value in topic_entries(bootstrap, topic) if k == key.encode()]


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def fast_app(start_app_worker: StartAppWorker) -> AppWorker:
    """One FAST worker shared by the tests that need no settings of their own and do not stop, pause
    or restart anything; each uses its own project ids, so none sees another's events or keys."""
    # Like worker_env: projects are never created by the producer side, each is metered on its own.
    return start_app_worker(**FAST, unknown_projects="export")


def test_single_and_batch_events_land_in_s3(broker, s3_client, fast_app: AppWorker) -> None:
    web, bucket = fast_app.web_url, fast_app.bucket
    key = create_project(web, "shop")

    for n in range(5):
        reply = record(web, "shop", key, "clicks", {"n": n, "user": {"id": n}})
        assert reply.status == 201, reply
        assert reply.json() == {"created": True}
    client_time = "2026-01-02T03:04:05.678Z"
    assert record(web, "shop", key, "clicks", {"n": 5, "keen": {"timestamp": client_time}}).status == 201
    batch = {"clicks": [{"n": 100 + i} for i in range(50)], "views": [{"n": i} for i in range(20)]}
    reply = record_batch(web, "shop", key, batch)
    assert reply.status == 200, reply
    assert reply.json() == {"clicks": [{"success": True}] * 50, "views": [{"success": True}] * 20}

    want = Counter({("clicks", n): 1 for n in [*range(6), *range(100, 150)]})
    want.update({("views", n): 1 for n in range(20)})
    wait_until(lambda: len(exported(s3_client, bucket, "shop")) >= 76, 60, what="76 events in S3")
    time.sleep(1.5)  # anything written twice would show now
    events = exported(s3_client, bucket, "shop")
    assert Counter((coll, e["n"]) for coll, e in events) == want
    ids = [e["keen"]["id"] for _, e in events]
    assert len(set(ids)) == len(ids) and all(uuid.UUID(i).version == 4 for i in ids)
    assert all(e["keen"]["created_at"].endswith("Z") and e["keen"]["timestamp"] for _, e in events)
    [client] = [e for coll, e in events if coll == "clicks" and e["n"] == 5]
    assert client["keen"]["timestamp"] == client_time and client["keen"]["created_at"] != client_time

    # The batch request became one batch record per collection, not one record per event.
    records = topic_records(broker.bootstrap, fast_app.events_topic, "shop")
    batched = sorted((r["collection"], len(r["events"])) for r in records if "events" in r)
    assert batched == [("clicks", 50), ("views", 20)]
    assert sum(1 for r in records if "event" in r) == 6


def test_keys_are_checked_like_keen(fast_app: AppWorker) -> None:
    web = fast_app.web_url
    key = create_project(web, "locked")
    other = create_project(web, "other")

    for bad in (None, "", "wrong", other, key[:-1], key + "0"):
        reply = record(web, "locked", bad, "clicks", {"n": 1})
        assert reply.status == 401, (bad, reply)
        assert reply.json()["error_code"] == "InvalidApiKeyError" and reply.json()["message"]
    # An unknown project answers exactly like a wrong key: project ids cannot be enumerated (issue #10).
    unknown, wrong = record(web, "nope", key, "clicks", {"n": 1}), record(web, "locked", "wrong", "clicks", {"n": 1})
    assert (unknown.status, unknown.json()) == (wrong.status, wrong.json()) == (401, wrong.json())
    # Keen clients may also pass the key as the api_key query parameter.
    reply = http("POST", f"{web}/3.0/projects/locked/events/clicks?api_key={key}", {"n": 2})
    assert reply.status == 201, reply
    assert record(web, "locked", key, "clicks", {"n": 3}).status == 201
    # CORS preflight for browser clients.
    assert http("OPTIONS", f"{web}/3.0/projects/locked/events/clicks").status == 204


def test_bad_requests_are_rejected_and_nothing_of_them_is_written(
    broker, s3_client, bucket, worker_env, start_worker
) -> None:
    env = worker_env(**FAST, max_event_bytes=2000, api_max_body_bytes=50_000)
    web = start_worker(env).web_url
    key = create_project(web, "strict")

    def expect(status: int, code: str, reply: Reply) -> None:
        assert reply.status == status, reply
        assert reply.json()["error_code"] == code and reply.json()["message"], reply

    expect(400, "InvalidJsonError", record(web, "strict", key, "clicks", b'{"n": 1,'))
    expect(400, "InvalidJsonError", record(web, "strict", key, "clicks", b"[1, 2]"))
    expect(400, "InvalidJsonError", record(web, "strict", key, "clicks", b""))
    expect(400, "InvalidCollectionNameError", record(web, "strict", key, "bad.name", {"n": 1}))
    expect(400, "EventTooLargeError", record(web, "strict", key, "clicks", {"n": 1, "pad": "x" * 3000}))
    expect(400, "InvalidEventError", record(web, "strict", key, "clicks", {"n": 1, "keen": 5}))
    expect(413, "RequestEntityTooLargeError", record(web, "strict", key, "clicks", {"pad": "x" * 60_000}))
    expect(400, "InvalidJsonError", record_batch(web, "strict", key, b"{nope"))
    expect(400, "InvalidJsonError", record_batch(web, "strict", key, {"clicks": {"n": 1}}))
    expect(413, "RequestEntityTooLargeError", record_batch(web, "strict", key, {"c": [{"p": "x" * 1000}] * 60}))

    # A batch with some bad events: the good ones are written, each bad one is reported.
    mixed = {"clicks": [{"n": 10}, 7, {"n": 11, "pad": "x" * 3000}, {"n": 12}], "bad name": [{"n": 13}]}
    reply = record_batch(web, "strict", key, mixed)
    assert reply.status == 200, reply
    results = reply.json()
    assert [r["success"] for r in results["clicks"]] == [True, False, False, True]
    assert results["clicks"][1]["error"]["name"] == "InvalidEventError"
    assert results["clicks"][2]["error"]["name"] == "EventTooLargeError"
    assert results["bad name"][0]["error"]["name"] == "InvalidCollectionNameError"
    assert record(web, "strict", key, "clicks", {"n": 1}).status == 201

    wait_until(lambda: len(exported(s3_client, bucket, "strict")) >= 3, 60, what="the good events in S3")
    time.sleep(1.5)
    assert sorted(e["n"] for _, e in exported(s3_client, bucket, "strict")) == [1, 10, 12]
    records = topic_records(broker.bootstrap, env["STREAMAPP_EVENTS_TOPIC"], "strict")
    written = sorted(e["n"] for r in records for e in (r["events"] if "events" in r else [r["event"]]))
    assert written == [1, 10, 12], "nothing of a rejected request reaches Kafka"


def test_shed_project_gets_429_while_another_project_gets_201(fast_app: AppWorker) -> None:
    web = fast_app.web_url
    loud = create_project(web, "loud", quota_eps=2)
    quiet = create_project(web, "quiet")
    reply = http("POST", f"{web}/admin/projects/loud/shed", {"reason": "incident 42"}, ADMIN)
    assert reply.status == 200 and reply.json()["replicated"] is True, reply

    # The bucket holds 2 tokens and refills 2/s: however long the requests take on a busy machine,
    # the loud project gets at most 2 + 2 x elapsed requests through, the rest are 429.
    started = time.monotonic()
    loud_replies = [record(web, "loud", loud, "clicks", {"n": n}) for n in range(20)]
    while loud_replies[-1].status != 429 and len(loud_replies) < 60:  # the batch follows a refusal
        loud_replies.append(record(web, "loud", loud, "clicks", {"n": len(loud_replies)}))
    batch_reply = record_batch(web, "loud", loud, {"clicks": [{"n": n} for n in range(10)]})
    elapsed = time.monotonic() - started
    quiet_replies = [record(web, "quiet", quiet, "clicks", {"n": n}) for n in range(5)]

    assert [r.status for r in quiet_replies] == [201] * 5
    statuses = Counter(r.status for r in loud_replies)
    assert set(statuses) <= {201, 429}, statuses
    allowed = 2 + math.ceil(2 * elapsed)
    assert statuses[201] <= allowed and statuses[429] >= len(loud_replies) - allowed, (statuses, elapsed)
    assert loud_replies[-1].status == 429
    # A batch needs a full bucket (or its own tokens): right after a refusal there are fewer than 2.
    assert batch_reply.status == 429, batch_reply
    rejected = [r for r in loud_replies if r.status == 429]
    for r in rejected:
        assert int(r.headers["Retry-After"]) >= 1
        body = r.json()
        assert body["error_code"] == "TooManyRequestsError"
        assert "incident 42" in body["reason"] and body["retry_after"] == int(r.headers["Retry-After"])
    server_ms = sorted(float(r.headers["X-Streamapp-Server-Ms"]) for r in rejected)
    assert server_ms[len(server_ms) // 2] < 2.0, server_ms

    # Operator unshed: the project is admitted again at once.
    reply = http("DELETE", f"{web}/admin/projects/loud/shed", {"reason": "over"}, ADMIN)
    assert reply.status == 200 and reply.json()["override"]["action"] == "unshed", reply
    assert [record(web, "loud", loud, "clicks", {"n": 100 + n}).status for n in range(10)] == [201] * 10


def api_inflight(web: str) -> float:
    """The worker's count of API requests waiting on Kafka acks (its /metrics gauge)."""
    text = http("GET", f"{web}/metrics").body.decode()
    match = re.search(r"^streamapp_api_inflight (\S+)$", text, re.MULTILINE)
    assert match, "streamapp_api_inflight in /metrics"
    return float(match.group(1))


def test_paused_broker_gives_fast_503_and_recovers_without_losing_accepted_events(
    broker, s3_client, bucket, worker_env, start_worker
) -> None:
    env = worker_env(**FAST, api_max_inflight=4, api_produce_timeout_seconds=2)
    web = start_worker(env).web_url
    key = create_project(web, "steady")
    accepted: list[int] = []
    counter = iter(range(1_000_000))
    lock = threading.Lock()

    def send(timeout: float = 30) -> Reply:
        with lock:
            n = next(counter)
        reply = record(web, "steady", key, "clicks", {"n": n}, timeout=timeout)
        if reply.status == 201:
            with lock:
                accepted.append(n)
        return reply

    def expect_fast_503(reply: Reply, message: str) -> None:
        assert reply.status == 503, reply
        assert message in reply.json()["message"], reply
        assert reply.elapsed < 0.1, reply
        assert int(reply.headers["Retry-After"]) >= 1
        assert reply.json()["error_code"] == "ServiceUnavailableError"

    for _ in range(20):
        assert send().status == 201

    pool = ThreadPoolExecutor(max_workers=8)
    # 1. The in-flight bound: 4 writes wait on the stopped broker, the next ones get 503 at once.
    broker.pause()
    try:
        stuck = [pool.submit(send) for _ in range(4)]
        wait_until(lambda: api_inflight(web) == 4, 10, interval=0.05, what="4 writes waiting on Kafka")
        assert not any(f.done() for f in stuck), "writes cannot be acknowledged while the broker is stopped"
        for _ in range(3):
            expect_fast_503(send(), "4 writes are waiting on Kafka (limit 4)")
        # They time out (2 s): 503, and the client knows nothing was acknowledged.
        for f in stuck:
            assert "did not acknowledge the write within 2s" in f.result(timeout=10).json()["message"]
        # 2. After a failed write one request probes Kafka; the others fail fast meanwhile.
        probe = pool.submit(send)
        wait_until(lambda: api_inflight(web) == 1, 10, interval=0.05, what="the probe waiting on Kafka")
        for _ in range(3):
            expect_fast_503(send(), "Kafka is failing writes")
        assert "did not acknowledge" in probe.result(timeout=10).json()["message"], "the broker is still stopped"
    finally:
        broker.resume()
    wait_until(lambda: send().status == 201, 30, interval=0.2, what="writes accepted again")

    # 3. Kafka stalled below the bound: one write hangs; past the stall time (1 s without an ack)
    # new writes get 503 at once although only 1 of 4 in-flight slots is taken.
    broker.pause()
    try:
        hanging = pool.submit(send)
        wait_until(lambda: api_inflight(web) == 1, 10, interval=0.05, what="one write waiting on Kafka")
        time.sleep(1.2)
        assert not hanging.done()
        for _ in range(3):
            expect_fast_503(send(), "Kafka has not acknowledged a write for over 1s")
    finally:
        broker.resume()
    hanging.result(timeout=10)  # 201 or 503 (timed out): the ack check below counts what was accepted
    pool.shutdown()

    # Recovers by itself: writes succeed again without any restart.
    wait_until(lambda: send().status == 201, 30, interval=0.2, what="writes accepted again")
    statuses = Counter(send().status for _ in range(30))
    assert statuses[201] == 30, statuses

    # Every accepted event is in S3 exactly once; a refused one at most once (a write that timed
    # out may still have reached Kafka: the client retries it under a new request).
    def exported_ns() -> Counter[int]:
        return Counter(e["n"] for _, e in exported(s3_client, bucket, "steady"))

    wait_until(lambda: set(accepted) <= set(exported_ns()), 90, what=f"all {len(accepted)} accepted events in S3")
    time.sleep(1.5)  # anything written twice would show now
    counts = exported_ns()
    assert all(counts[n] == 1 for n in accepted), {n: counts[n] for n in accepted if counts[n] != 1}
    assert max(counts.values()) == 1, "no event written twice"
    assert len(accepted) == len(set(accepted))


def test_admin_api_and_project_cli(broker, fast_app: AppWorker, capsys) -> None:
    web = fast_app.web_url

    assert http("GET", f"{web}/admin/projects").status == 401
    assert http("GET", f"{web}/admin/projects", headers={"Authorization": "Bearer nope"}).status == 401
    assert http("POST", f"{web}/admin/projects", {"project_id": "bad id"}, ADMIN).status == 400
    assert http("POST", f"{web}/admin/projects", {"project_id": "p", "quota_eps": -1}, ADMIN).status == 400

    assert cli_main(["project", "create", "cli-proj", "--web", web, "--token", TOKEN, "--quota-eps", "50"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["project_id"] == "cli-proj" and len(created["write_key"]) == 64
    assert record(web, "cli-proj", created["write_key"], "clicks", {"n": 1}).status == 201
    assert cli_main(["project", "create", "cli-proj", "--web", web, "--token", TOKEN]) == 1  # exists: 409
    assert "409" in capsys.readouterr().err
    assert cli_main(["project", "create", "no-s3", "--no-s3", "--web", web, "--token", TOKEN]) == 0
    capsys.readouterr()

    assert cli_main(["project", "list", "--web", web, "--token", TOKEN]) == 0
    table = capsys.readouterr().out
    assert "cli-proj" in table and "no-s3" in table and created["write_key"] not in table
    assert cli_main(["project", "list", "--web", web, "--token", "wrong"]) == 1
    capsys.readouterr()

    # Without --web the CLI goes straight through the control topic (no worker needed); every
    # worker picks the project up from its replicated view.
    kafka = ["--bootstrap", broker.bootstrap, "--topic", fast_app.events_topic + "-control"]
    assert cli_main(["project", "create", "via-kafka", "--quota-eps", "20", *kafka]) == 0
    via_kafka = json.loads(capsys.readouterr().out)
    wait_until(
        lambda: record(web, "via-kafka", via_kafka["write_key"], "clicks", {"n": 1}).status == 201,
        10,
        interval=0.1,
        what="the worker to accept the key published on the control topic",
    )
    assert cli_main(["project", "create", "cli-proj", *kafka]) == 1  # already has a key
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["project", "list", *kafka]) == 0
    table = capsys.readouterr().out
    assert "via-kafka" in table and "cli-proj" in table
    assert via_kafka["write_key"] not in table, "keys are shown once, at creation, never listed (issue #10)"

    reply = http("PUT", f"{web}/admin/projects/cli-proj/quota", {"quota_eps": 75, "shed_mode": "drop"}, ADMIN)
    assert reply.status == 200 and reply.json()["replicated"] is True, reply
    listed = {p["project_id"]: p for p in http("GET", f"{web}/admin/projects", headers=ADMIN).json()["projects"]}
    assert listed["cli-proj"]["quota_eps"] == 75.0 and listed["cli-proj"]["shed_mode"] == "drop"
    assert listed["no-s3"]["s3_streaming"] is False
    assert http("PUT", f"{web}/admin/projects/cli-proj/quota", {"quota_eps": "x"}, ADMIN).status == 400

    reply = http("POST", f"{web}/admin/projects/cli-proj/shed", {"reason": "test", "mode": "drop"}, ADMIN)
    assert reply.status == 200, reply
    assert http("GET", f"{web}/admin/projects/cli-proj", headers=ADMIN).json()["override"]["action"] == "shed"
    reply = http("DELETE", f"{web}/admin/projects/cli-proj/shed?clear=true", None, ADMIN)
    assert reply.status == 200 and reply.json()["override"] is None, reply
    assert http("GET", f"{web}/admin/projects/cli-proj", headers=ADMIN).json()["override"] is None
