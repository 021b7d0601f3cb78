"""Pure logic of the Keen-compatible API (streamapp.api) and the admin API's validation."""

from __future__ import annotations

import uuid

import orjson
import pytest

from streamapp import api as keen
from streamapp.api import ApiError, Clock, EventRejected
from streamapp.cli.project import render_projects
from streamapp.contract import encode_record, parse_iso_seconds, parse_record
from streamapp.control.admin import parse_quota
from streamapp.metering.shed import ShedState
from streamapp.web import auth

NOW = Clock.at(1_795_000_000.25)


def ids():
    counter = iter(range(1_000_000))
    return lambda: f"id-{next(counter)}"


# --------------------------------------------------------------------------- auth


def test_write_key_comes_from_the_authorization_header_first_then_api_key() -> None:
    assert auth.write_key_from("abc", "def") == "abc"
    assert auth.write_key_from(None, "def") == "def"
    assert auth.write_key_from("", " def ") == "def"
    assert auth.write_key_from(None, None) is None


def test_keys_match_is_exact_and_never_matches_an_empty_project_key() -> None:
    assert auth.keys_match("k" * 64, "k" * 64)
    assert not auth.keys_match("k" * 63, "k" * 64)
    assert not auth.keys_match("x" + "k" * 63, "k" * 64)
    assert not auth.keys_match(None, "key")
    assert not auth.keys_match("", "")  # a project created by a quota record has no key
    assert not auth.keys_match("anything", "")
    assert not auth.keys_match("ké", "ke")  # non-ASCII input is compared, not an exception


def test_bearer_token() -> None:
    assert auth.bearer_token("Bearer t0k") == "t0k"
    assert auth.bearer_token("bearer   t0k ") == "t0k"
    assert auth.bearer_token("t0k") is None
    assert auth.bearer_token("Basic t0k") is None
    assert auth.bearer_token("Bearer ") is None
    assert auth.bearer_token(None) is None


# --------------------------------------------------------------------------- bodies


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "empty"),
        (b"{bad", "not valid JSON"),
        (b"[1, 2]", "JSON list"),
        (b'"text"', "JSON str"),
        (b"null", "JSON NoneType"),
    ],
)
def test_parse_object_rejects_what_is_not_a_json_object(body: bytes, fragment: str) -> None:
    with pytest.raises(ApiError) as info:
        keen.parse_object(body)
    assert info.value.status == 400
    assert fragment in info.value.message
    assert orjson.loads(info.value.body()) == {"message": info.value.message, "error_code": keen.INVALID_JSON}


def test_collection_names_follow_the_contract() -> None:
    keen.check_collection("page_views-2")
    for bad in ("", "a b", "a.b", "x" * 65, "$keen"):
        with pytest.raises(ApiError) as info:
            keen.check_collection(bad)
        assert (info.value.status, info.value.error_code) == (400, keen.INVALID_COLLECTION)


def test_check_batch_counts_events_and_rejects_non_list_values() -> None:
    assert keen.check_batch({"a": [{}, {}], "b": []}) == 2
    with pytest.raises(ApiError) as info:
        keen.check_batch({"a": [{}], "b": {"not": "a list"}})
    assert info.value.status == 400 and "'b'" in info.value.message


# --------------------------------------------------------------------------- enrichment


def test_enrich_sets_id_created_at_and_keeps_a_valid_client_timestamp() -> None:
    event = {"n": 1, "keen": {"timestamp": "2026-01-02T03:04:05.678Z", "id": "client-id", "created_at": "x"}}
    keen.enrich(event, NOW)
    assert event["keen"]["timestamp"] == "2026-01-02T03:04:05.678Z"
    assert event["keen"]["created_at"] == NOW.iso == "2026-11-18T11:06:40.250Z"
    assert uuid.UUID(event["keen"]["id"]).version == 4  # the server's id, not the client's


@pytest.mark.parametrize("timestamp", [None, "yesterday", 12345, "2026-13-45T00:00:00Z", ""])
def test_enrich_replaces_a_missing_or_invalid_timestamp_with_now(timestamp: object) -> None:
    event: dict = {"keen": {} if timestamp is None else {"timestamp": timestamp}}
    keen.enrich(event, NOW)
    assert event["keen"]["timestamp"] == NOW.iso
    assert parse_iso_seconds(event["keen"]["timestamp"]) == pytest.approx(1_795_000_000.25)


def test_enrich_creates_the_keen_object_and_ids_are_unique() -> None:
    events = [{"n": i} for i in range(1000)]
    for e in events:
        keen.enrich(e, NOW)
    assert len({e["keen"]["id"] for e in events}) == 1000


@pytest.mark.parametrize("event", [5, "text", [1], None])
def test_enrich_rejects_non_objects(event: object) -> None:
    with pytest.raises(EventRejected) as info:
        keen.enrich(event, NOW)
    assert info.value.name == keen.INVALID_EVENT
    assert info.value.result() == {
        "success": False,
        "error": {"name": keen.INVALID_EVENT, "description": info.value.description},
    }


def test_enrich_rejects_a_keen_property_that_is_not_an_object() -> None:
    with pytest.raises(EventRejected):
        keen.enrich({"keen": "nope"}, NOW)


def test_encode_event_applies_the_size_limit_to_the_enriched_event() -> None:
    new_id = ids()
    small = keen.encode_event({"a": "x" * 10}, NOW, 1000, new_id)
    assert orjson.loads(small)["keen"]["id"] == "id-0"
    size = len(small)
    assert keen.encode_event({"a": "x" * 10}, NOW, size, new_id)  # exactly at the limit
    with pytest.raises(EventRejected) as info:
        keen.encode_event({"a": "x" * 11}, NOW, size, new_id)
    assert info.value.name == keen.EVENT_TOO_LARGE


# --------------------------------------------------------------------------- records


def test_build_records_matches_contract_encode_record() -> None:
    events = [{"n": i, "s": "é"} for i in range(3)]
    encoded = [orjson.dumps(e) for e in events]
    [batch] = keen.build_records("proj", "clicks", encoded, 1_000_000)
    assert orjson.loads(batch) == orjson.loads(encode_record("proj", "clicks", events))
    [single] = keen.build_records("proj", "clicks", encoded[:1], 1_000_000)
    assert orjson.loads(single) == orjson.loads(encode_record("proj", "clicks", events[:1]))
    parsed = parse_record(batch, 1_000_000)
    assert (parsed.project_id, parsed.collection, parsed.events) == ("proj", "clicks", events)
    assert keen.build_records("proj", "clicks", [], 1000) == []


def test_build_records_splits_in_order_and_never_exceeds_the_record_limit() -> None:
    encoded = [orjson.dumps({"n": i, "pad": "p" * (i % 37)}) for i in range(500)]
    limit = 2000
    records = keen.build_records("proj", "clicks", encoded, limit)
    assert len(records) > 1
    assert all(len(r) <= limit for r in records)
    back = [e["n"] for r in records for e in parse_record(r, limit).events]
    assert back == list(range(500))
    # as few records as possible: each record but the last could not take the next event
    firsts = [len(orjson.dumps(parse_record(r, limit).events[0])) for r in records]
    assert all(len(r) + 1 + nxt > limit for r, nxt in zip(records, firsts[1:], strict=False))


def test_max_event_bytes_for_keeps_one_event_inside_one_record() -> None:
    limit = keen.max_event_bytes_for("proj", "clicks", 10_000, 1000)
    head, tail = keen.record_envelope("proj", "clicks", single=True)
    assert limit == 1000 - len(head) - len(tail)
    event = orjson.dumps({"p": "x" * (limit - 8)})
    assert len(event) == limit
    assert len(keen.build_records("proj", "clicks", [event], 1000)[0]) == 1000
    assert keen.max_event_bytes_for("proj", "clicks", 100, 1000) == 100


def test_plan_batch_writes_good_events_and_reports_each_bad_one() -> None:
    doc = {
        "clicks": [{"n": 0}, 5, {"n": 2, "keen": "bad"}, {"n": 3, "big": "x" * 500}, {"n": 4}],
        "bad name": [{"n": 0}, {"n": 1}],
        "views": [],
        "signups": [{"n": 0}],
    }
    plans = keen.plan_batch("proj", doc, NOW, max_event_bytes=300, max_record_bytes=100_000, new_id=ids())
    results = keen.batch_response(plans)
    assert list(results) == ["clicks", "bad name", "views", "signups"]
    assert [r["success"] for r in results["clicks"]] == [True, False, False, False, True]
    assert [r["error"]["name"] for r in results["clicks"] if not r["success"]] == [
        keen.INVALID_EVENT,
        keen.INVALID_EVENT,
        keen.EVENT_TOO_LARGE,
    ]
    # One error entry per bad collection, not per event: the answer does not grow with the events.
    assert [r["error"]["name"] for r in results["bad name"]] == [keen.INVALID_COLLECTION]
    assert results["views"] == [] and results["signups"] == [{"success": True}]
    by_collection = {p.collection: p for p in plans}
    assert by_collection["bad name"].records == [] and by_collection["views"].records == []
    [clicks] = by_collection["clicks"].records  # one batch record per collection
    parsed = parse_record(clicks, 100_000)
    assert [e["n"] for e in parsed.events] == [0, 4]
    assert all(e["keen"]["created_at"] == NOW.iso for e in parsed.events)
    assert by_collection["clicks"].accepted == 2 and by_collection["signups"].accepted == 1


def test_plan_batch_splits_a_collection_over_the_record_limit() -> None:
    doc = {"clicks": [{"n": i, "pad": "x" * 200} for i in range(100)]}
    plans = keen.plan_batch("proj", doc, NOW, max_event_bytes=100_000, max_record_bytes=5000, new_id=ids())
    records = plans[0].records
    assert len(records) >= 6 and all(len(r) <= 5000 for r in records)
    assert [e["n"] for r in records for e in parse_record(r, 5000).events] == list(range(100))
    assert all(r["success"] for r in keen.batch_response(plans)["clicks"])


# --------------------------------------------------------------------------- admission


def decide(state=None, override=None, quota=None, now=1000.0, cooldown=30.0):
    return keen.shed_decision("proj", state, override, quota_eps=quota, default_eps=1000.0, now=now, cooldown=cooldown)


def test_not_shed_without_state_or_override() -> None:
    assert decide() is None
    assert decide(state=ShedState("proj").to_dict()) is None


def test_shed_state_from_the_meter_gives_its_limit_and_a_retry_after_from_the_cooldown() -> None:
    state = ShedState("proj", state="shed", since=990.0, reason="rate 5000 ev/s > limit 1500", limit_eps=250.0)
    shed = decide(state.to_dict(), quota=100.0)
    assert shed == keen.Shed(250.0, "rate 5000 ev/s > limit 1500", 30)
    below = ShedState("proj", state="shed", limit_eps=250.0, below_since=980.0)
    assert decide(below.to_dict(), now=1000.0).retry_after == 10  # the rest of the cooldown
    no_limit = ShedState("proj", state="shed")
    assert decide(no_limit.to_dict(), quota=100.0).limit_eps == 100.0
    assert decide(no_limit.to_dict()).limit_eps == 1000.0  # default quota


def test_shadow_mode_and_unshed_override_never_reject() -> None:
    shadow = ShedState("proj", state="shed", mode="shadow", limit_eps=10.0).to_dict()
    assert decide(shadow) is None
    shed = ShedState("proj", state="shed", limit_eps=10.0).to_dict()
    assert decide(shed, override={"action": "unshed"}) is None


def test_a_manual_shed_override_sheds_before_any_meter_reacts() -> None:
    shed = decide(override={"action": "shed", "reason": "incident 42"}, quota=5.0, cooldown=12.5)
    assert shed == keen.Shed(5.0, "manual shed: incident 42", 13)
    assert decide(override={"action": "shed", "mode": "shadow"}) is None


def test_the_operators_reason_stays_once_a_meter_has_taken_the_manual_shed_over() -> None:
    override = {"action": "shed", "reason": "incident 42"}
    taken_over = ShedState("proj", state="shed", manual="shed", reason="manual shed", limit_eps=5.0).to_dict()
    assert decide(taken_over, override=override).reason == "manual shed: incident 42"
    # A shed the meter decided on its own (no override) keeps the meter's reason.
    decided = ShedState("proj", state="shed", reason="burst 50 eps over 10", limit_eps=5.0).to_dict()
    assert decide(decided).reason == "burst 50 eps over 10"


def test_a_malformed_shed_state_still_sheds() -> None:
    assert decide({"state": "shed", "mode": "bogus"}, quota=7.0) == keen.Shed(7.0, "shed", 30)


def test_a_request_of_n_events_costs_n_tokens_and_the_debt_is_paid_before_the_next() -> None:
    bucket = keen.bucket_for(10.0)
    assert bucket.capacity == 1.0  # no stored burst for a shed project
    assert keen.admit(bucket, 0.0, 6)  # one token is enough to start a request; it costs all 6
    assert not keen.can_admit_any(bucket, 0.0)
    assert not keen.admit(bucket, 0.4, 1)  # 5 tokens of debt: 0.6 s at 10 tokens/s
    assert keen.can_admit_any(bucket, 0.6)
    assert keen.admit(bucket, 0.6, 500)  # larger than anything stored: admitted, 499 tokens of debt
    assert not keen.admit(bucket, 1.1, 1)
    assert keen.retry_after_for(bucket, 1.1, keen.Shed(10.0, "shed", 1)) == 50  # (499 - 5 + 1) / 10 s, up


def test_tiny_limits_still_admit_one_event_per_interval() -> None:
    bucket = keen.bucket_for(0.5)
    assert bucket.capacity == 1.0
    assert keen.admit(bucket, 0.0, 1)
    assert not keen.admit(bucket, 1.0, 1)
    assert keen.admit(bucket, 2.0, 1)


def test_shed_error_is_a_429_with_retry_after_and_the_reason() -> None:
    err = keen.shed_error("proj", keen.Shed(5.0, "manual shed: incident", 17))
    assert err.status == 429 and err.headers == {"Retry-After": "17"}
    body = orjson.loads(err.body())
    assert body["error_code"] == keen.TOO_MANY_REQUESTS
    assert body["reason"] == "manual shed: incident" and body["retry_after"] == 17 and body["limit_eps"] == 5.0
    assert "proj" in body["message"]


def test_unavailable_is_a_503_with_retry_after() -> None:
    err = keen.unavailable("Kafka is slow", retry_after=0)
    assert (err.status, err.headers, err.error_code) == (503, {"Retry-After": "1"}, keen.UNAVAILABLE)


# --------------------------------------------------------------------------- admin + CLI helpers


def test_parse_quota_validates_numbers_and_modes() -> None:
    assert parse_quota({"quota_eps": 10, "burst": 0, "shed_mode": "drop"}, require_any=True) == {
        "quota_eps": 10.0,
        "burst": 0.0,
        "shed_mode": "drop",
    }
    assert parse_quota({"quota_eps": None}, require_any=True) == {"quota_eps": None}
    assert parse_quota({}, require_any=False) == {}
    for bad in ({"quota_eps": 0}, {"quota_eps": True}, {"quota_eps": "5"}, {"burst": -1}, {"shed_mode": "x"}, {}):
        with pytest.raises(ApiError) as info:
            parse_quota(bad, require_any=True)
        assert info.value.status == 400


def test_render_projects_shows_whether_a_key_is_set_never_a_key() -> None:
    projects = [
        {"project_id": "a", "s3_streaming": True, "quota_eps": 50.0, "has_key": True},
        {"project_id": "b", "s3_streaming": False, "quota_eps": None, "has_key": False,
         "shed_state": {"state": "shed"}, "override": {"action": "shed"}},
    ]  # fmt: skip
    table = render_projects(projects)
    lines = table.splitlines()
    assert lines[1].startswith("a ") and lines[1].endswith("set")
    assert lines[2].startswith("b ") and lines[2].endswith("none")
    assert "shed (manual shed)" in table and "default" in table


def test_curl_example_is_a_working_command_line() -> None:
    line = keen.curl_example("http://127.0.0.1:6066/", "demo-01", "k3y")
    assert line.startswith("curl -sS -X POST 'http://127.0.0.1:6066/3.0/projects/demo-01/events/pageviews'")
    assert "-H 'Authorization: k3y'" in line
    body = line.split("-d '", 1)[1].rstrip("'")
    assert isinstance(orjson.loads(body), dict)


def test_uuid4_batch_makes_valid_unique_version_4_uuids() -> None:
    batch = keen.uuid4_batch(5000)
    assert len(set(batch)) == 5000
    for text in batch[:500]:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text
    ids = {keen.new_event_id() for _ in range(3000)}  # across pool refills
    assert len(ids) == 3000
