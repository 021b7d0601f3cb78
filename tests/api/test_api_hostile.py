"""The HTTP API against hostile clients: one worker for the whole module (real broker and S3).

* property-based: generated methods, paths, query strings, headers and bodies (JSON, bytes; gzip,
  x-gzip, zlib and raw deflate, concatenated, broken, truncated or trailed gzip, any
  Content-Encoding text; events with generated ``keen.addons``, from ``tests/addon_configs.py``) never get
  a 5xx other than the documented 503, and nothing of a refused request reaches the events topic
  (every generated event carries a marker);
* admission: a shed project's admitted events over ~10 s stay within its limit plus one request,
  for batch sizes from 1 to the cap;
* isolation: an honest project's write latency (p99 < 50 ms) while another client sends
  maximum-size bodies and 50 slow connections trickle bytes;
* limits: batch caps, one error per bad collection, gzip, the body-read deadline and budget.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamapp.api import Shed, admit, bucket_for, retry_after_for
from streamapp.dev import BrokerProcess, S3Process, WorkerProcess
from tests.addon_configs import addon_configs
from tests.api_helpers import ADMIN_TOKEN, Reply, admin, create_project, module_worker, request, topic_values, write

pytestmark = pytest.mark.integration

MAX_BODY = 10 * 1024 * 1024
BATCH_CAP = 5000
READ_DEADLINE = 2.0
SHED_EPS = 20.0


@dataclass
class Api:
    worker: WorkerProcess
    env: dict[str, object]
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def web(self) -> str:
        return self.worker.web_url

    def events(self) -> list[bytes]:
        return topic_values(str(self.env["kafka_bootstrap"]), str(self.env["events_topic"]))


@pytest.fixture(scope="module")
def api(broker: BrokerProcess, s3: S3Process, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with module_worker(
        broker,
        s3,
        tmp_path_factory.mktemp("hostile"),
        api_body_read_timeout_seconds=READ_DEADLINE,
        api_max_batch_events=BATCH_CAP,
    ) as (worker, env):
        state = Api(worker, env)
        for project in ("prop", "honest", "hog", "limits", "bulk"):
            state.keys[project] = create_project(state.web, project)
        yield state


def status_ok(reply: Reply) -> bool:
    """2xx, 4xx, or the documented 503 (with Retry-After); never another 5xx."""
    if 200 <= reply.status < 300 or 400 <= reply.status < 500:
        return True
    return reply.status == 503 and "retry-after" in reply.headers


# --------------------------------------------------------------------------- property-based

NAMES = st.sampled_from(["clicks", "views", "a-b_c", "x" * 64])
WEIRD = st.text(max_size=24).map(lambda t: urllib.parse.quote(t, safe=""))
JSON_LEAF = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ADDONS = addon_configs(JSON)
HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@dataclass
class Sent:
    marker: str
    status: int
    body: bytes


SENT: list[Sent] = []


@st.composite
def hostile_request(draw: st.DrawFn, keys: dict[str, str]) -> tuple[str, str, bytes | None, dict[str, str], str]:
    marker = uuid.uuid4().hex

    def event() -> Any:
        value = draw(JSON)
        if isinstance(value, dict) and draw(st.booleans()):
            value["mk"] = marker
        elif draw(st.booleans()):
            value = {"mk": marker, "v": value}
        if isinstance(value, dict) and draw(st.integers(0, 3)) == 0:
            value["keen"] = {"addons": draw(ADDONS)}  # the API checks them before it writes the event
        return value

    # Half the requests are well-formed apart from their generated events (so some get written and
    # the "nothing of a refused request" check has both kinds); the rest are hostile everywhere.
    plausible = draw(st.booleans())
    project = "prop" if plausible else draw(st.sampled_from(["prop", "nope"]) | WEIRD)
    shape = draw(st.sampled_from(["single", "batch"] if plausible else ["single", "batch", "other", "admin"]))
    if shape == "single":
        path = f"/3.0/projects/{project}/events/{draw(NAMES if plausible else NAMES | WEIRD)}"
        doc: Any = event()
    elif shape == "batch":
        path = f"/3.0/projects/{project}/events"
        doc = {draw(NAMES | st.text(max_size=70)): [event() for _ in range(draw(st.integers(0, 5)))] for _ in range(3)}
        if draw(st.integers(0, 9)) == 0:
            doc = {"clicks": event()}  # a value that is not a list
    else:
        path = draw(
            st.sampled_from(
                ["/", "/3.0/projects", "/3.0/projects/prop", "/admin/projects", "/rates/", "/shed/", "/sink/",
                 "/metrics", "/readyz", "/healthz", "/_meter/", "/dashboard/session", "/rates/prop/"]
            )
        ) + draw(st.sampled_from(["", "x", "/..", "%00", "/%2e%2e/admin"]))  # fmt: skip
        doc = event()
    if shape == "admin":
        # The admin API with its token and generated bodies, on its own project (never "prop").
        suffix = draw(st.sampled_from(["", "/adm", "/adm/key", "/adm/quota", "/adm/shed", "/nope/key"]))
        path = "/admin/projects" + suffix
        fields = st.sampled_from(["project_id", "grace_seconds", "quota_eps", "burst", "shed_mode", "reason", "mode",
                                  "s3_streaming", "clear", "bucket", "prefix"])  # fmt: skip
        doc = draw(st.dictionaries(fields, JSON, max_size=4))
        if suffix == "" and draw(st.booleans()):
            doc["project_id"] = draw(st.sampled_from(["adm", "adm-2"]) | WEIRD)
    query_names = st.sampled_from(["api_key", "token", "local", "limit", "series", "x"]) | HEADER_TEXT
    query = draw(st.lists(st.tuples(query_names, HEADER_TEXT), max_size=0 if plausible else 3))
    if query:
        path += "?" + urllib.parse.urlencode(query)
    methods = ["POST"] if plausible else ["POST"] * 3 + ["GET", "PUT", "DELETE", "OPTIONS", "PATCH", "HEAD"]
    method = draw(st.sampled_from(methods))
    headers: dict[str, str] = {}
    key = "valid" if plausible else draw(st.sampled_from(["valid", "wrong", "none", "bearer"]))
    if shape == "admin" and draw(st.integers(0, 4)):
        headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    elif key == "valid":
        headers["Authorization"] = keys["prop"]
    elif key == "wrong":
        headers["Authorization"] = draw(HEADER_TEXT) or "x"
    elif key == "bearer":
        headers["Authorization"] = f"Bearer {keys['prop']}"
    if draw(st.booleans()):
        content_types = ["application/json", "text/plain", "", "application/json; charset=latin-1"]
        headers["Content-Type"] = draw(st.sampled_from(content_types))
    raw_kind = "json" if plausible else draw(st.sampled_from(["json", "bytes", "empty", "none"]))
    if raw_kind == "json":
        body: bytes | None = json.dumps(doc).encode()
    elif raw_kind == "bytes":
        body = draw(st.binary(max_size=200)) + marker.encode()
    elif raw_kind == "empty":
        body = b""
    else:
        body = None
    encodings = ["", "gzip", "x-gzip", "deflate", "raw-deflate", "gzip-members", "identity"]
    hostile_encodings = ["broken-gzip", "truncated-gzip", "gzip-then-junk", "br", "x"]
    encoding = draw(st.sampled_from(encodings if plausible else [*encodings, *hostile_encodings]) | HEADER_TEXT)
    if encoding and body is not None:
        if encoding in ("gzip", "x-gzip"):
            body = gzip.compress(body)
        elif encoding == "deflate":
            body = zlib.compress(body)
        elif encoding == "raw-deflate":  # RFC 1951 under "deflate", as some clients send it
            squeeze = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            body, encoding = squeeze.compress(body) + squeeze.flush(), "deflate"
        elif encoding == "gzip-members":  # two concatenated gzip members: one body
            cut = draw(st.integers(0, len(body)))
            body, encoding = gzip.compress(body[:cut]) + gzip.compress(body[cut:]), "gzip"
        elif encoding == "broken-gzip":
            body, encoding = gzip.compress(body)[:-6] + b"\x00garbage", "gzip"
        elif encoding == "truncated-gzip":
            whole = gzip.compress(body)
            body, encoding = whole[: draw(st.integers(0, len(whole) - 1))], "gzip"
        elif encoding == "gzip-then-junk":
            body, encoding = gzip.compress(body) + draw(st.binary(min_size=1, max_size=16)), "gzip"
        headers["Content-Encoding"] = encoding
    extra_names = st.sampled_from(["X-Forwarded-For", "Cookie", "Accept", "X-Junk", "Origin"])
    headers.update(draw(st.dictionaries(extra_names, HEADER_TEXT, max_size=2)))
    return method, path, body, headers, marker


@pytest.fixture(scope="module")
def sent_log() -> list[Sent]:
    return SENT


def test_generated_requests_never_get_an_unexpected_5xx(api: Api, sent_log: list[Sent]) -> None:
    @settings(max_examples=160, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        method, path, body, headers, marker = data.draw(hostile_request(api.keys))
        reply = request(api.web, method, path, body, headers, timeout=30)
        assert status_ok(reply), (method, path, headers, body[:200] if body else body, reply)
        sent_log.append(Sent(marker, reply.status, reply.body))

    check()
    assert len(sent_log) >= 100
    statuses = Counter(s.status for s in sent_log)
    assert statuses[200] + statuses[201] > 0 and statuses[400] + statuses[401] + statuses[404] > 0, statuses


def test_nothing_of_a_refused_request_is_written(api: Api, sent_log: list[Sent]) -> None:
    if not sent_log:
        pytest.fail("run with test_generated_requests_never_get_an_unexpected_5xx first (module order)")
    values = b"\n".join(api.events())
    written = [s for s in sent_log if s.marker.encode() in values]
    refused = [s for s in sent_log if s.status not in (200, 201) and b"may still be written" not in s.body]
    assert written, "some generated requests were accepted and are on the events topic"
    leaked = [s for s in refused if s.marker.encode() in values]
    assert leaked == [], leaked[:5]


# --------------------------------------------------------------------------- admission


def test_a_shed_project_is_held_to_its_limit_plus_one_request_whatever_the_batch_size(api: Api) -> None:
    web = api.web
    sizes = (1, 37, 700, BATCH_CAP)
    keys = {}
    for size in sizes:
        project = f"loud-{size}"
        keys[size] = create_project(web, project, quota_eps=SHED_EPS)
        reply = admin(web, "POST", f"/admin/projects/{project}/shed", {"reason": "test"})
        assert reply.status == 200 and reply.json()["replicated"] is True, reply
    sent: Counter[int] = Counter()
    limits: set[float] = set()
    retry_after: dict[int, list[int]] = {size: [] for size in sizes}
    lock = threading.Lock()
    started = time.monotonic()
    stop_at = started + 10.0

    def hammer(size: int) -> None:
        body = {"clicks": [{"i": i} for i in range(size)]}
        while time.monotonic() < stop_at:
            try:
                reply = write(web, f"loud-{size}", keys[size], body, timeout=30)
            except OSError:
                continue  # the server may answer 429 and close before the body is sent
            with lock:
                sent[size] += size
                if reply.status == 429:
                    limits.add(float(reply.json()["limit_eps"]))
                    retry_after[size].append(int(reply.headers["retry-after"]))
                else:
                    assert reply.status == 200, reply

    threads = [threading.Thread(target=hammer, args=(size,)) for size in sizes for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    span = time.monotonic() - started  # every admission happened within this span
    assert len(limits) == 1, limits
    limit = limits.pop()
    assert limit == SHED_EPS

    admitted: Counter[int] = Counter()
    for value in api.events():
        record = json.loads(value)
        project = record.get("project_id", "")
        # Event records only (the workers' own shed markers name the project too, without events).
        if project.startswith("loud-") and "collection" in record and ("events" in record or "event" in record):
            admitted[int(project.split("-")[1])] += len(record["events"]) if "events" in record else 1
    print(f"\nshed at {limit:g} ev/s over {span:.1f} s: sent {dict(sent)}, admitted {dict(admitted)}")
    for size in sizes:
        bound = limit * span + size  # the limit over the span, plus one request
        assert 0 < admitted[size] <= bound, (size, admitted[size], bound)
        assert sent[size] >= 3 * admitted[size] or size == BATCH_CAP, (size, sent[size], admitted[size])
    # The cap-sized batch put the bucket ~250 s in debt: the answers say so instead of "retry in 1 s".
    assert retry_after[BATCH_CAP] and min(retry_after[BATCH_CAP]) >= (BATCH_CAP - limit * span) / limit - 1


@settings(max_examples=300, deadline=None)
@given(
    rate=st.sampled_from([0.5, 2.0, 20.0, 1000.0]),
    requests=st.lists(st.tuples(st.floats(0, 0.5), st.integers(1, BATCH_CAP)), min_size=1, max_size=200),
)
def test_admitted_events_over_any_window_are_at_most_rate_times_window_plus_one_request(
    rate: float, requests: list[tuple[float, int]]
) -> None:
    """The pure admission rule, for any arrival pattern and batch sizes: over every span between two
    admissions, admitted <= rate x span + the largest request (the issue's "limit plus one request")."""
    bucket = bucket_for(rate)
    now = 0.0
    admitted: list[tuple[float, int]] = []
    for gap, size in requests:
        now += gap
        if admit(bucket, now, size):
            admitted.append((now, size))
        else:
            assert retry_after_for(bucket, now, Shed(rate, "shed", 1)) >= 1
    largest = max(size for _, size in requests)
    for i, (start, _) in enumerate(admitted):
        total = 0
        for at, size in admitted[i:]:
            total += size
            assert total <= rate * (at - start) + largest + 1e-6, (start, at, total)


# --------------------------------------------------------------------------- isolation


def honest_writes(api: Api, seconds: float) -> tuple[list[float], Counter[int], list[float]]:
    """Sequential single-event writes of the honest project on one keep-alive connection:
    (sorted client-side latencies in ms, statuses, sorted handler times in ms from the server)."""
    host, port = api.web.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Authorization": api.keys["honest"], "Content-Type": "application/json"}
    latencies: list[float] = []
    server: list[float] = []
    statuses: Counter[int] = Counter()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        body = json.dumps({"n": len(latencies), "page": "/home"}).encode()
        began = time.perf_counter()
        conn.request("POST", "/3.0/projects/honest/events/clicks", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        latencies.append((time.perf_counter() - began) * 1000)
        server.append(float(response.getheader("X-Streamapp-Server-Ms") or 0.0))
        statuses[response.status] += 1
        time.sleep(0.01)
    conn.close()
    return sorted(latencies), statuses, sorted(server)


def p99(latencies: list[float]) -> float:
    return latencies[max(0, int(len(latencies) * 0.99) - 1)]


def test_honest_writes_stay_fast_while_others_send_huge_bodies_and_trickle_bytes(api: Api) -> None:
    """p99 of honest single-event writes < 50 ms under hostile load from another process.

    The same writes are first measured without the hostile load: on a machine too busy for a 50 ms
    p99 even then, the failure message says so (the bound is not loosened).
    """
    quiet, _, _ = honest_writes(api, 2.0)
    host, port = api.web.removeprefix("http://").rsplit(":", 1)
    seconds = 9.0
    hostile = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("hostile_load.py")), host, port, "hog", api.keys["hog"],
         str(seconds), str(MAX_BODY - 64), "50", "5"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        time.sleep(2.0)  # let the slow connections open and the first huge body arrive
        latencies, statuses, handler = honest_writes(api, seconds - 3.0)
        out, _ = hostile.communicate(timeout=90)
    finally:
        if hostile.poll() is None:
            hostile.kill()
            hostile.wait()
    summary = json.loads(out.strip().splitlines()[-1])
    measured = (
        f"honest writes under load: {len(latencies)}, p50 {statistics.median(latencies):.1f} ms, "
        f"p99 {p99(latencies):.1f} ms, max {latencies[-1]:.1f} ms (handler p99 {p99(handler):.1f} ms); "
        f"without load: p50 "
        f"{statistics.median(quiet):.1f} ms, p99 {p99(quiet):.1f} ms; hostile: {summary}"
    )
    print("\n" + measured)
    assert statuses == Counter({201: len(latencies)}), statuses
    assert summary["max_open"] >= 50, summary  # the 50 slow connections were all open at once
    assert summary["big"].get("json:413", 0) >= 1, summary  # huge bodies were read and parsed (and refused)
    assert any(k in summary["slow"] for k in ("408", "503")), summary  # slow bodies got the deadline/budget
    assert p99(latencies) < 50.0, measured


# --------------------------------------------------------------------------- limits


def test_batch_caps_refuse_the_whole_request_and_bad_collections_are_reported_once(api: Api) -> None:
    web, key = api.web, api.keys["limits"]
    over = write(web, "limits", key, {"a": [{"mk": "cap-events"}] * (BATCH_CAP - 10), "b": [{}] * 11})
    assert over.status == 413 and b"5001 events" in over.body, over
    many = write(web, "limits", key, {f"c{i}": [{"mk": "cap-colls"}] for i in range(101)})
    assert many.status == 413 and b"101 collections" in many.body, many
    bad = write(web, "limits", key, {"bad name!": [{"mk": "bad-coll"}] * 4000, "good": [{"mk": "good-coll"}]})
    assert bad.status == 200, bad
    assert len(bad.body) < 400, bad  # one error entry, not 4000
    assert [r["success"] for r in bad.json()["bad name!"]] == [False]
    assert bad.json()["good"] == [{"success": True}]
    values = b"\n".join(api.events())
    assert b"good-coll" in values
    assert b"cap-events" not in values and b"cap-colls" not in values and b"bad-coll" not in values


def test_big_valid_batches_are_planned_in_the_parse_process_and_written(api: Api) -> None:
    # Its own project, the batch last: 5,000 events at once put a project over its rate limit,
    # and the meter may shed it a moment later (that would refuse any write after it).
    web, key = api.web, api.keys["bulk"]
    one = write(web, "bulk", key, {"mk": "big-single", "pad": "q" * 90_000}, "big", timeout=60)
    assert one.status == 201, one
    padding = "p" * 300
    body = {"big": [{"mk": "big-batch", "i": i, "pad": padding} for i in range(BATCH_CAP)]}
    assert len(json.dumps(body)) > 1_000_000  # far over the inline threshold: the parse process plans it
    reply = write(web, "bulk", key, body, timeout=60)
    assert reply.status == 200 and reply.json() == {"big": [{"success": True}] * BATCH_CAP}, reply
    values = b"\n".join(api.events())
    assert values.count(b"big-batch") == BATCH_CAP and values.count(b"big-single") == 1


def test_gzip_and_deflate_bodies_are_accepted_with_a_decompressed_limit(api: Api) -> None:
    web, key = api.web, api.keys["limits"]
    zipped = {"Content-Encoding": "gzip"}
    one = write(web, "limits", key, gzip.compress(b'{"mk": "gz-single"}'), "clicks", headers=zipped)
    assert one.status == 201, one
    batch = write(
        web, "limits", key, gzip.compress(json.dumps({"c": [{"mk": "gz-batch"}] * 3}).encode()), headers=zipped
    )
    assert batch.status == 200 and batch.json() == {"c": [{"success": True}] * 3}, batch
    deflated = write(web, "limits", key, zlib.compress(b'{"mk": "deflate-single"}'), "clicks",
                     headers={"Content-Encoding": "deflate"})  # fmt: skip
    assert deflated.status == 201, deflated
    bomb = gzip.compress(b'{"c": [' + b" " * (MAX_BODY + 1024) + b"]}", 9)
    assert len(bomb) < 100_000
    refused = write(web, "limits", key, bomb, headers=zipped)
    assert refused.status == 413 and b"expands more than" in refused.body, refused
    # JSON that compresses ~33x (under the ratio limit) and is over the size limit once
    # decompressed: the size limit applies. (~330 KB on the wire: received whole before the 413.)
    rows = [f"{i:07d}" + "abcdefghij" * 8 for i in range(MAX_BODY // 90 + 2000)]
    large = gzip.compress(json.dumps({"c": rows}).encode(), 9)
    assert len(large) < MAX_BODY // 25
    over = write(web, "limits", key, large, headers=zipped, timeout=60)
    assert over.status == 413 and b"byte limit" in over.body, over
    broken = write(web, "limits", key, gzip.compress(b'{"mk": "gz-broken"}')[:-8] + b"xxxxxxxx", "c", headers=zipped)
    assert broken.status == 400, broken
    assert write(web, "limits", key, b"{}", "c", headers={"Content-Encoding": "br2"}).status == 415
    values = b"\n".join(api.events())
    assert b"gz-single" in values and values.count(b"gz-batch") == 3 and b"deflate-single" in values
    assert b"gz-broken" not in values


def test_a_slow_body_gets_408_at_the_deadline_and_the_budget_refuses_at_once(api: Api) -> None:
    host, port = api.web.removeprefix("http://").rsplit(":", 1)
    time.sleep(READ_DEADLINE + 1)  # bodies of earlier tests' slow clients are past their deadline

    def slow(declared: int) -> socket.socket:
        sock = socket.create_connection((host, int(port)), timeout=30)
        head = (
            f"POST /3.0/projects/limits/events HTTP/1.1\r\nHost: x\r\nAuthorization: {api.keys['limits']}\r\n"
            f"Content-Length: {declared}\r\n\r\n{{"
        )
        sock.sendall(head.encode())
        return sock

    began = time.monotonic()
    first = slow(MAX_BODY)
    holders = [slow(MAX_BODY) for _ in range(7)]  # 8 x 10 MiB > the 64 MiB budget
    statuses = []
    for sock in [first, *holders]:
        data = sock.recv(200)
        statuses.append(int(data.split()[1]))
        sock.close()
    waited = time.monotonic() - began
    assert statuses.count(408) >= 6 and statuses.count(503) >= 1, statuses
    assert READ_DEADLINE - 0.5 <= waited <= READ_DEADLINE + 15, waited
    # Small writes have their headroom: they pass while big bodies fill the budget.
    assert write(api.web, "limits", api.keys["limits"], {"n": 1}, "c").status == 201
