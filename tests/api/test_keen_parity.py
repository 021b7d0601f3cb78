"""Keen write-API parity against ONE real worker (real Tansu broker, real moto S3): CORS as Keen
serves it, the image beacon (GET), ``api_key`` in the query string, navigator.sendBeacon's
text/plain POST, Keen's size limits and error bodies, and the data enrichment add-ons through the
API and through a raw Kafka record (dead letter for a bad configuration)."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamapp.api import PIXEL_GIF
from streamapp.dev import BrokerProcess, S3Process
from tests.api.test_api_integration import ADMIN, FAST, create_project, exported, http, topic_records
from tests.conftest import app_worker
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

CHROME_UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)
IPHONE_UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.5 Mobile/15E148 Safari/604.1"
)
ORIGIN = "http://shop.example.test:8080"
#: Keen's documented limits: 900,000 bytes per event, 10 MB per request.
KEEN_MAX_EVENT_BYTES = 900_000


@dataclass
class Stack:
    web: str
    bucket: str
    bootstrap: str
    events_topic: str
    key: str
    project: str
    s3_client: Any


@pytest.fixture(scope="module")
def stack(
    broker: BrokerProcess, s3: S3Process, s3_client: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One worker for the module; 127.0.0.1 is a trusted proxy (the tests play the proxy)."""
    tmp = tmp_path_factory.mktemp("keen-parity")
    with app_worker(broker, s3, tmp, prefix="k", trusted_proxies="127.0.0.1/32", **FAST) as app:
        key = create_project(app.web_url, "webshop")
        yield Stack(app.web_url, app.bucket, broker.bootstrap, app.events_topic, key, "webshop", s3_client)


def events_url(stack: Stack, collection: str | None = None, **query: str) -> str:
    path = f"{stack.web}/3.0/projects/{stack.project}/events" + (f"/{collection}" if collection else "")
    return path + ("?" + urllib.parse.urlencode(query) if query else "")


def beacon_data(event: Any) -> str:
    return base64.b64encode(json.dumps(event).encode()).decode()


def in_s3(stack: Stack, collection: str) -> list[dict[str, Any]]:
    return [event for coll, event in exported(stack.s3_client, stack.bucket, stack.project) if coll == collection]


def wait_for(stack: Stack, collection: str, count: int) -> list[dict[str, Any]]:
    wait_until(lambda: len(in_s3(stack, collection)) >= count, 60, what=f"{count} events of {collection} in S3")
    return in_s3(stack, collection)


def assert_keen_error(reply: Any, status: int, error_code: str | None = None) -> None:
    assert reply.status == status, reply
    assert reply.headers["Access-Control-Allow-Origin"] == "*", "errors carry CORS headers so the SDK can read them"
    body = reply.json()
    assert {"message", "error_code"} <= body.keys() and body["message"], body
    if error_code is not None:
        assert body["error_code"] == error_code, body


# --------------------------------------------------------------------------- CORS


def test_preflight_allows_what_keen_sdks_send(stack: Stack) -> None:
    for url in (events_url(stack, "clicks"), events_url(stack)):
        reply = http(
            "OPTIONS",
            url,
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,keen-sdk",
            },
        )
        assert reply.status == 204, reply
        allowed = {h.strip().lower() for h in reply.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type", "keen-sdk"} <= allowed
        assert {"GET", "POST"} <= {m.strip() for m in reply.headers["Access-Control-Allow-Methods"].split(",")}
        assert int(reply.headers["Access-Control-Max-Age"]) >= 600
        assert reply.headers["Access-Control-Allow-Origin"] == "*"


def test_every_error_of_the_write_routes_is_keen_shaped_with_cors(stack: Stack) -> None:
    json_headers = {"Content-Type": "application/json", "Origin": ORIGIN}
    assert_keen_error(http("POST", events_url(stack, "c", api_key="wrong"), {"a": 1}, json_headers), 401)
    # An unknown project answers like a wrong key (401): project ids cannot be enumerated (issue #10).
    unknown = http("POST", f"{stack.web}/3.0/projects/nope/events/c?api_key={stack.key}", {"a": 1}, json_headers)
    assert_keen_error(unknown, 401, "InvalidApiKeyError")
    assert_keen_error(http("POST", events_url(stack, "c", api_key=stack.key), b"{nope", json_headers), 400)
    assert_keen_error(http("POST", events_url(stack, "bad%20name!", api_key=stack.key), {"a": 1}, json_headers), 400)
    # GET: the same answers, JSON bodies instead of the pixel.
    assert_keen_error(http("GET", events_url(stack, "c", api_key="wrong", data=beacon_data({"a": 1}))), 401)
    assert_keen_error(http("GET", events_url(stack, "c", api_key=stack.key)), 400)
    assert_keen_error(http("GET", events_url(stack, "c", api_key=stack.key, data="***")), 400)
    assert_keen_error(http("GET", events_url(stack, "c", api_key=stack.key, data=beacon_data([1, 2]))), 400)


# --------------------------------------------------------------------------- writes of browsers


def test_image_beacon_answers_a_gif_and_writes_once(stack: Stack) -> None:
    event = {"page": "/pricing?plan=pro#faq", "n": 1, "text": "caf\u00e9 >>> ???"}
    reply = http("GET", events_url(stack, "pixels", api_key=stack.key, data=beacon_data(event), modified="1"))
    assert reply.status == 200, reply
    assert reply.headers["Content-Type"] == "image/gif" and reply.body == PIXEL_GIF
    assert reply.headers["Access-Control-Allow-Origin"] == "*"
    # The Authorization header works for GET too (Keen accepts the key either way).
    reply = http("GET", events_url(stack, "pixels", data=beacon_data({"n": 2})), headers={"Authorization": stack.key})
    assert reply.status == 200 and reply.body == PIXEL_GIF, reply
    # Keen's SDK sends image beacons of up to 16,000 URL characters.
    long_url = events_url(stack, "pixels", api_key=stack.key, data=beacon_data({"n": 3, "pad": "p" * 11_500}))
    assert 15_000 < len(long_url) < 16_000
    reply = http("GET", long_url)
    assert reply.status == 200 and reply.body == PIXEL_GIF, reply
    events = wait_for(stack, "pixels", 3)
    assert sorted(e["n"] for e in events) == [1, 2, 3], events
    assert next(e for e in events if e["n"] == 1)["text"] == event["text"]


def test_send_beacon_text_plain_post_with_api_key_query(stack: Stack) -> None:
    body = json.dumps({"n": 7, "unload": True}).encode()
    headers = {"Content-Type": "text/plain;charset=UTF-8", "Origin": ORIGIN}
    reply = http("POST", events_url(stack, "unloads", api_key=stack.key), body, headers)
    assert reply.status == 201 and reply.json() == {"created": True}, reply
    batch = json.dumps({"unloads": [{"n": 8}, {"n": 9}]}).encode()
    reply = http("POST", events_url(stack, None, api_key=stack.key), batch, headers)
    assert reply.status == 200 and reply.json() == {"unloads": [{"success": True}] * 2}, reply
    assert sorted(e["n"] for e in wait_for(stack, "unloads", 3)) == [7, 8, 9]


def test_image_beacon_has_the_same_admission_as_post(stack: Stack) -> None:
    web = stack.web
    key = create_project(web, "loudpixel", quota_eps=1)
    reply = http("POST", f"{web}/admin/projects/loudpixel/shed", {"reason": "pixel storm"}, ADMIN)
    assert reply.status == 200, reply
    try:
        url = f"{web}/3.0/projects/loudpixel/events/p?" + urllib.parse.urlencode(
            {"api_key": key, "data": beacon_data({"n": 1})}
        )
        statuses = Counter(http("GET", url).status for _ in range(10))
        assert statuses[429] >= 8, statuses
        rejected = http("GET", url)
        assert_keen_error(rejected, 429, "TooManyRequestsError")
        assert int(rejected.headers["Retry-After"]) >= 1
    finally:
        http("DELETE", f"{web}/admin/projects/loudpixel/shed?clear=true", None, ADMIN)


def test_keen_size_limits(stack: Stack) -> None:
    headers = {"Content-Type": "application/json", "Authorization": stack.key}
    near_limit = {"blob": "x" * (KEEN_MAX_EVENT_BYTES - 1000)}
    reply = http("POST", events_url(stack, "big"), near_limit, headers)
    assert reply.status == 201, f"Keen accepts an event of {KEEN_MAX_EVENT_BYTES - 1000} bytes: {reply}"
    over = {"blob": "x" * (KEEN_MAX_EVENT_BYTES + 10)}
    assert_keen_error(http("POST", events_url(stack, "big"), over, headers), 400, "EventTooLargeError")
    assert len(wait_for(stack, "big", 1)[0]["blob"]) == KEEN_MAX_EVENT_BYTES - 1000


# --------------------------------------------------------------------------- add-ons


def all_addons_event(marker: str) -> dict[str, Any]:
    return {
        "marker": marker,
        "ip_address": "${keen.ip}",
        "user_agent": "${keen.user_agent}",
        "page_url": "https://shop.example.com/products/42?color=red&size=m#reviews",
        "referrer_url": "https://www.google.com/search?q=red+shoes&hl=en",
        "keen": {
            "timestamp": "2026-11-28T23:30:15.250Z",
            "addons": [
                {"name": "keen:ip_to_geo", "input": {"ip": "ip_address"}, "output": "ip_geo_info"},
                {"name": "keen:ua_parser", "input": {"ua_string": "user_agent"}, "output": "parsed_user_agent"},
                {"name": "keen:url_parser", "input": {"url": "page_url"}, "output": "parsed_page_url"},
                {
                    "name": "keen:referrer_parser",
                    "input": {"referrer_url": "referrer_url", "page_url": "page_url"},
                    "output": "referrer_info",
                },
                {"name": "keen:date_time_parser", "input": {"date_time": "keen.timestamp"}, "output": "timestamp_info"},
            ],
        },
    }


def assert_enriched(event: dict[str, Any], *, ip: str, country_code: str | None, device: str) -> None:
    assert event["ip_address"] == ip
    assert "addons" not in event["keen"]
    assert event["ip_geo_info"]["country_code"] == country_code
    assert event["parsed_user_agent"]["device"]["family"] == device
    assert event["parsed_page_url"] == {
        "protocol": "https",
        "domain": "shop.example.com",
        "path": "/products/42",
        "anchor": "reviews",
        "query_string": {"color": "red", "size": "m"},
    }
    assert event["referrer_info"] == {"medium": "SEARCH", "source": "Google", "term": "red shoes"}
    assert event["timestamp_info"]["day_of_week_string"] == "Saturday" and event["timestamp_info"]["hour"] == 23


def test_addons_through_the_api_with_placeholders(stack: Stack) -> None:
    # 127.0.0.1 is a trusted proxy here: the right-most untrusted X-Forwarded-For hop is the client.
    headers = {
        "Content-Type": "application/json",
        "Authorization": stack.key,
        "User-Agent": IPHONE_UA,
        "X-Forwarded-For": "6.6.6.6, 81.2.69.160",
    }
    assert http("POST", events_url(stack, "enriched"), all_addons_event("post"), headers).status == 201
    beacon = http(
        "GET",
        events_url(stack, "enriched", api_key=stack.key, data=beacon_data(all_addons_event("pixel"))),
        headers={"User-Agent": CHROME_UA, "X-Forwarded-For": "2001:4860:4860::8888"},
    )
    assert beacon.status == 200, beacon
    batch = http("POST", events_url(stack), {"enriched": [all_addons_event("batch")]}, headers)
    assert batch.status == 200 and batch.json() == {"enriched": [{"success": True}]}, batch
    events = {e["marker"]: e for e in wait_for(stack, "enriched", 3)}
    assert_enriched(events["post"], ip="81.2.69.160", country_code="GB", device="iPhone")
    assert events["post"]["user_agent"] == IPHONE_UA
    assert_enriched(events["batch"], ip="81.2.69.160", country_code="GB", device="iPhone")
    assert_enriched(events["pixel"], ip="2001:4860:4860::8888", country_code="US", device="Other")
    assert events["pixel"]["parsed_user_agent"]["browser"]["family"] == "Chrome"


def test_bad_addon_configuration_is_a_400_and_a_failed_batch_entry(stack: Stack) -> None:
    headers = {"Content-Type": "application/json", "Authorization": stack.key}
    bad = {"keen": {"addons": [{"name": "keen:ua_parser", "input": {}, "output": "x"}]}}
    reply = http("POST", events_url(stack, "badaddons"), bad, headers)
    assert_keen_error(reply, 400, "InvalidEventError")
    assert "ua_string" in reply.json()["message"]
    reply = http("POST", events_url(stack), {"badaddons": [bad, {"n": 1}]}, headers)
    assert reply.status == 200, reply
    results = reply.json()["badaddons"]
    assert results[0]["success"] is False and "ua_string" in results[0]["error"]["description"]
    assert results[1] == {"success": True}


def produce(stack: Stack, values: list[bytes]) -> None:
    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
        await producer.start()
        try:
            for value in values:
                await producer.send_and_wait(stack.events_topic, value, key=stack.project.encode())
        finally:
            await producer.stop()

    asyncio.run(send())


def test_addons_on_a_raw_kafka_record_and_dead_letter_for_bad_ones(stack: Stack) -> None:
    good = all_addons_event("kafka")
    good["ip_address"] = "81.2.69.160"
    good["user_agent"] = IPHONE_UA
    bad = {"marker": "kafka-bad", "keen": {"addons": [{"name": "keen:geo", "input": {"ip": "a"}, "output": "o"}]}}
    record = {"project_id": stack.project, "collection": "rawkafka", "events": [good, bad, {"marker": "plain"}]}
    produce(stack, [orjson.dumps(record)])
    events = {e["marker"]: e for e in wait_for(stack, "rawkafka", 2)}
    assert set(events) == {"kafka", "plain"}
    assert_enriched(events["kafka"], ip="81.2.69.160", country_code="GB", device="iPhone")
    assert "ip_geo_info" not in events["plain"]

    def dead_letters() -> list[dict[str, Any]]:
        return [
            r
            for r in topic_records(stack.bootstrap, f"{stack.events_topic}-invalid", stack.project)
            if "kafka-bad" in (r.get("value") or "")
        ]

    letters = wait_until(dead_letters, 60, what="the bad add-on event in events-invalid")
    assert len(letters) == 1 and "unknown add-on 'keen:geo'" in letters[0]["reason"], letters


ADDON_NAMES = st.sampled_from(
    ["keen:ip_to_geo", "keen:ua_parser", "keen:url_parser", "keen:referrer_parser", "keen:date_time_parser", "x"]
)
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)
ADDON = st.fixed_dictionaries(
    {"name": ADDON_NAMES, "input": st.dictionaries(st.text(max_size=12), ANY_JSON, max_size=3), "output": ANY_JSON}
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(addons=st.lists(ADDON, max_size=3) | ANY_JSON, via_get=st.booleans())
def test_hostile_addons_get_201_or_a_keen_400_never_a_5xx(stack: Stack, addons: Any, via_get: bool) -> None:
    event = {"h": 1, "ua": "${keen.user_agent}", "keen": {"addons": addons}}
    if via_get:
        reply = http("GET", events_url(stack, "hostile", api_key=stack.key, data=beacon_data(event)))
        assert reply.status in (200, 400), reply
    else:
        reply = http("POST", events_url(stack, "hostile"), event, {"Authorization": stack.key})
        assert reply.status in (201, 400), reply
    if reply.status == 400:
        assert reply.json()["error_code"] == "InvalidEventError"
    assert http("GET", f"{stack.web}/healthz").status == 200


#: The field that identifies each event of the Kafka property test (see its docstring).
MARKER = "identity_of_this_test_event"
PROPERTY_NAMES = st.sampled_from(["v", "v.x", "marker", "keen.timestamp", "keen", "missing", "a..b", ""])
HOSTILE_ADDON = st.fixed_dictionaries(
    {
        "name": ADDON_NAMES,
        "input": st.dictionaries(
            st.sampled_from(["ip", "ua_string", "url", "referrer_url", "page_url", "date_time", "remove_ip_property"]),
            PROPERTY_NAMES | ANY_JSON,
            max_size=3,
        ),
        "output": PROPERTY_NAMES | ANY_JSON,
    }
)


def test_hostile_addons_from_kafka_are_written_or_dead_lettered_exactly_once(stack: Stack) -> None:
    """Random add-on configurations and values from a raw producer: each event lands in S3 or in
    events-invalid (with a reason), exactly once; the partition keeps flowing.

    Each event is found by ``MARKER``, a field no generated add-on can read, write or remove (its
    name is in no strategy and longer than any generated text); an add-on writing its output to
    "marker" used to overwrite the event's identity, so the event could not be found.
    """
    sent: list[str] = []

    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        events=st.lists(
            st.fixed_dictionaries({"v": ANY_JSON, "addons": st.lists(HOSTILE_ADDON, max_size=3) | ANY_JSON}),
            min_size=1,
            max_size=6,
        )
    )
    def produce_examples(events: list[dict[str, Any]]) -> None:
        batch = []
        for drawn in events:
            marker = f"h-{uuid.uuid4().hex[:12]}"
            sent.append(marker)
            batch.append({MARKER: marker, "v": drawn["v"], "keen": {"addons": drawn["addons"]}})
        produce(stack, [orjson.dumps({"project_id": stack.project, "collection": "hostilekafka", "events": batch})])

    produce_examples()
    canary = f"canary-{uuid.uuid4().hex[:8]}"
    produce(
        stack, [orjson.dumps({"project_id": stack.project, "collection": "hostilekafka", "event": {MARKER: canary}})]
    )

    def dead_lettered() -> Counter[str]:
        found: Counter[str] = Counter()
        for letter in topic_records(stack.bootstrap, f"{stack.events_topic}-invalid", stack.project):
            value = orjson.loads(letter["value"]) if letter.get("value", "").startswith("{") else {}
            if isinstance(value, dict) and str(value.get(MARKER, "")).startswith("h-"):
                assert letter["reason"], letter
                found[value[MARKER]] += 1
        return found

    def written() -> Counter[str]:
        return Counter(str(e.get(MARKER)) for e in in_s3(stack, "hostilekafka"))

    wait_until(lambda: written()[canary] == 1, 90, what="the canary after the hostile records in S3")
    wait_until(lambda: set(sent) <= set(written()) | set(dead_lettered()), 60, what="every hostile event accounted")
    in_s3_counts, invalid_counts = written(), dead_lettered()
    for marker in sent:
        assert in_s3_counts[marker] + invalid_counts[marker] == 1, (
            marker,
            in_s3_counts[marker],
            invalid_counts[marker],
        )
    assert any(in_s3_counts[m] for m in sent) and any(invalid_counts[m] for m in sent), "both outcomes exercised"
    for event in in_s3(stack, "hostilekafka"):
        assert "addons" not in event["keen"], event
    assert http("GET", f"{stack.web}/healthz").status == 200
