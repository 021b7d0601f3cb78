"""Keen's data enrichment add-ons on real inputs (pure: streamapp.enrichment, the API's checks and
the sink's per-event hook in PartitionWindows), plus the API-side pieces: placeholders, the client
address behind trusted proxies, CORS preflight answers and the image beacon's ``data``."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamapp import api as keen
from streamapp import enrichment
from streamapp.api import ApiError
from streamapp.enrichment import AddonError, check_addons, client_ip, parse_trusted_proxies, run_addons
from streamapp.sink.partition import PartitionWindows

CHROME_UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)
IPHONE_UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.5 Mobile/15E148 Safari/604.1"
)
GOOGLE_DNS_V4 = "8.8.8.8"
GOOGLE_DNS_V6 = "2001:4860:4860::8888"
BT_UK_V4 = "81.2.69.160"  # MaxMind's own test address, in the United Kingdom


def addon(name: str, output: str, **inputs: Any) -> dict[str, Any]:
    return {"name": name, "input": inputs, "output": output}


def enriched(event: dict[str, Any]) -> dict[str, Any]:
    run_addons(event)
    return event


# --------------------------------------------------------------------------- ua_parser


def test_ua_parser_chrome_on_windows() -> None:
    event = enriched(
        {"ua": CHROME_UA, "keen": {"addons": [addon("keen:ua_parser", "parsed_user_agent", ua_string="ua")]}}
    )
    parsed = event["parsed_user_agent"]
    assert parsed["browser"] == {"family": "Chrome", "major": 126, "minor": 0, "patch": 0}
    assert parsed["os"]["family"] == "Windows" and parsed["os"]["major"] == 10
    assert parsed["device"] == {"family": "Other", "type": "desktop"}
    assert "addons" not in event["keen"], "Keen omits keen.addons from the recorded event"


def test_ua_parser_iphone() -> None:
    event = enriched(
        {
            "keen": {"addons": [addon("keen:ua_parser", "tech.ua", ua_string="client.agent")]},
            "client": {"agent": IPHONE_UA},
        }
    )
    parsed = event["tech"]["ua"]
    assert parsed["browser"]["family"] == "Mobile Safari"
    assert (parsed["browser"]["major"], parsed["browser"]["minor"]) == (17, 5)
    assert parsed["os"]["family"] == "iOS" and parsed["os"]["major"] == 17
    assert parsed["device"] == {"family": "iPhone", "type": "mobile phone"}


def test_ua_parser_reads_only_the_first_512_characters() -> None:
    """A hostile multi-kilobyte user agent costs what its first 512 characters cost."""
    long_ua = IPHONE_UA + " x" * 5000
    event = enriched({"ua": long_ua, "keen": {"addons": [addon("keen:ua_parser", "p", ua_string="ua")]}})
    assert event["p"] == enrichment.parse_user_agent(long_ua[: enrichment.MAX_USER_AGENT_CHARS])
    assert event["p"]["device"]["family"] == "iPhone"


def test_ua_parser_missing_input_gives_other_and_no_device_type() -> None:
    event = enriched({"keen": {"addons": [addon("keen:ua_parser", "p", ua_string="nowhere")]}})
    assert event["p"]["browser"]["family"] == "Other"
    assert "type" not in event["p"]["device"]


# --------------------------------------------------------------------------- url_parser


def test_url_parser_query_string_and_anchor() -> None:
    url = "https://keen.io:443/super-awesome-content?source=twitter&campaign=spring%20sale&empty=#title"
    event = enriched(
        {"page_url": url, "keen": {"addons": [addon("keen:url_parser", "parsed_page_url", url="page_url")]}}
    )
    assert event["parsed_page_url"] == {
        "protocol": "https",
        "domain": "keen.io",
        "path": "/super-awesome-content",
        "anchor": "title",
        "query_string": {"source": "twitter", "campaign": "spring sale", "empty": ""},
    }


def test_url_parser_omits_missing_parts() -> None:
    event = enriched({"u": "http://example.com", "keen": {"addons": [addon("keen:url_parser", "o", url="u")]}})
    assert event["o"] == {"protocol": "http", "domain": "example.com"}
    event = enriched({"u": "http://[::1", "keen": {"addons": [addon("keen:url_parser", "o", url="u")]}})
    assert event["o"] == {}, "a malformed URL gives an empty object, not an error"


# --------------------------------------------------------------------------- referrer_parser


def test_referrer_parser_search_engine_with_term() -> None:
    event = enriched(
        {
            "referrer": "https://www.google.com/search?q=keen+io+data+enrichment&hl=en",
            "page": "https://shop.example.com/products/42",
            "keen": {
                "addons": [addon("keen:referrer_parser", "referrer_info", referrer_url="referrer", page_url="page")]
            },
        }
    )
    assert event["referrer_info"] == {"medium": "SEARCH", "source": "Google", "term": "keen io data enrichment"}


def test_referrer_parser_internal_social_and_unknown() -> None:
    def parse(ref: str, page: str = "https://shop.example.com/a") -> dict[str, Any]:
        return enrichment.parse_referrer(ref, page)

    assert parse("https://shop.example.com/b")["medium"] == "INTERNAL"
    assert parse("https://www.facebook.com/some/post") == {"medium": "SOCIAL", "source": "Facebook", "term": None}
    assert parse("https://blog.unknown-site.example/post")["medium"] == "UNKNOWN"
    assert parse("not a url") == {"medium": None, "source": None, "term": None}


# --------------------------------------------------------------------------- ip_to_geo


def test_ip_to_geo_ipv4_and_ipv6() -> None:
    event = enriched(
        {
            "v4": BT_UK_V4,
            "v6": GOOGLE_DNS_V6,
            "keen": {
                "addons": [
                    addon("keen:ip_to_geo", "geo4", ip="v4"),
                    addon("keen:ip_to_geo", "geo6", ip="v6"),
                ]
            },
        }
    )
    assert event["geo4"]["country_code"] == "GB" and event["geo4"]["country"] == "United Kingdom"
    assert event["geo6"]["country_code"] == "US" and event["geo6"]["country"] == "United States"
    for geo in (event["geo4"], event["geo6"]):
        assert set(geo) == {"city", "province", "country", "country_code", "continent", "postal_code", "coordinates"}
        assert geo["city"] is None and geo["coordinates"] is None  # the bundled database is country-level


def test_ip_to_geo_private_and_malformed_give_nulls_and_remove_ip_property() -> None:
    event = enriched(
        {
            "ip": "192.168.0.1",
            "bad": "${keen.ip}",
            "keen": {
                "addons": [
                    addon("keen:ip_to_geo", "g1", ip="ip", remove_ip_property=True),
                    addon("keen:ip_to_geo", "g2", ip="bad"),
                ]
            },
        }
    )
    assert "ip" not in event, "remove_ip_property drops the address after the lookup"
    assert all(v is None for v in event["g1"].values()) and all(v is None for v in event["g2"].values())
    # The cached result is copied: mutating one event's output does not change the next one's.
    first = enriched({"ip": GOOGLE_DNS_V4, "keen": {"addons": [addon("keen:ip_to_geo", "g", ip="ip")]}})
    first["g"]["country"] = "mutated"
    second = enriched({"ip": GOOGLE_DNS_V4, "keen": {"addons": [addon("keen:ip_to_geo", "g", ip="ip")]}})
    assert second["g"]["country"] == "United States"


# --------------------------------------------------------------------------- date_time_parser


def test_date_time_parser() -> None:
    event = enriched(
        {
            "keen": {
                "timestamp": "2026-11-28T23:30:15.250-02:00",
                "addons": [addon("keen:date_time_parser", "when", date_time="keen.timestamp")],
            }
        }
    )
    # 23:30 at -02:00 is 01:30 UTC on Sunday 29 November 2026.
    assert event["when"] == {
        "millisecond": 250,
        "second": 15,
        "minute": 30,
        "hour": 1,
        "day_of_week": 7,
        "day_of_week_string": "Sunday",
        "day_of_month": 29,
        "week": 48,
        "month": 11,
        "year": 2026,
        "timezone_offset": -2,
    }
    bad = enriched({"d": "yesterday", "keen": {"addons": [addon("keen:date_time_parser", "w", date_time="d")]}})
    assert bad["w"] is None
    edge = enriched(
        {"d": "9999-12-31T23:59:59-23:59", "keen": {"addons": [addon("keen:date_time_parser", "w", date_time="d")]}}
    )
    assert edge["w"] is None, "out of range once moved to UTC: blank, not a crash"


# --------------------------------------------------------------------------- bad configurations


@pytest.mark.parametrize(
    ("addons", "why"),
    [
        ("keen:ua_parser", "must be a list"),
        ([{"name": "keen:nope", "input": {}, "output": "x"}], "unknown add-on"),
        ([{"name": "keen:ua_parser", "output": "x"}], "'input' must be an object"),
        ([{"name": "keen:ua_parser", "input": {}, "output": "x"}], "input 'ua_string' is missing"),
        ([{"name": "keen:ua_parser", "input": {"ua_string": 5}, "output": "x"}], "must be a property name"),
        ([{"name": "keen:url_parser", "input": {"url": "u", "x": "y"}, "output": "o"}], "unknown input 'x'"),
        ([{"name": "keen:url_parser", "input": {"url": "u"}}], "'output' must be a property name"),
        ([{"name": "keen:url_parser", "input": {"url": "u"}, "output": "keen.id"}], "may not be inside 'keen'"),
        ([{"name": "keen:url_parser", "input": {"url": "a..b"}, "output": "o"}], "empty property name"),
        (
            [{"name": "keen:ip_to_geo", "input": {"ip": "i", "remove_ip_property": "yes"}, "output": "o"}],
            "true or false",
        ),
        ([{"name": "keen:url_parser", "input": {"url": "u"}, "output": "o"}] * 11, "over the limit"),
        (
            [{"name": "keen:ip_to_geo", "input": {"ip": "keen", "remove_ip_property": True}, "output": "o"}],
            "may not remove",
        ),
    ],
)
def test_bad_configuration_is_a_clear_error(addons: Any, why: str) -> None:
    with pytest.raises(AddonError, match=why):
        check_addons(addons)
    with pytest.raises(keen.EventRejected, match=why):
        keen.enrich({"keen": {"addons": addons}}, keen.Clock(1_764_000_000_000), lambda: "id")


def test_output_through_a_non_object_is_an_error() -> None:
    with pytest.raises(AddonError, match="is not an object"):
        run_addons(
            {"u": "http://a.example", "o": 5, "keen": {"addons": [addon("keen:url_parser", "o.parsed", url="u")]}}
        )
    # The API sees it before accepting the event (else the client's 201 would end in a dead letter).
    with pytest.raises(keen.EventRejected, match="is not an object"):
        keen.enrich(
            {"o": {"x": "text"}, "keen": {"addons": [addon("keen:url_parser", "o.x.parsed", url="u")]}},
            keen.Clock(1_764_000_000_000),
            lambda: "id",
        )
    ok = {"o": {"x": {}}, "keen": {"addons": [addon("keen:url_parser", "o.x.parsed", url="u")]}}
    keen.enrich(ok, keen.Clock(1_764_000_000_000), lambda: "id")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(addons=JSON, event=st.dictionaries(st.text(max_size=8), JSON, max_size=4))
def test_any_addons_value_enriches_or_raises_addon_error(addons: Any, event: dict[str, Any]) -> None:
    """Whatever a tenant puts in keen.addons: enriched, or AddonError - never another exception."""
    event["keen"] = {"addons": addons}
    try:
        run_addons(event)
    except AddonError as exc:
        assert exc.reason
    else:
        assert "addons" not in event["keen"]
        orjson.dumps(event)


PATHS = st.sampled_from(["v", "v.x", "keen", "keen.timestamp", "keen.id", "missing.deep", "a..b", ""])
PARAMS = st.sampled_from(["ip", "ua_string", "url", "referrer_url", "page_url", "date_time", "remove_ip_property"])
STRUCTURED_ADDONS = st.lists(
    st.fixed_dictionaries(
        {
            "name": st.sampled_from(sorted(enrichment.ADDON_INPUTS)) | st.text(max_size=5),
            "input": st.dictionaries(PARAMS, PATHS | st.booleans() | JSON, max_size=4),
            "output": PATHS | JSON,
        }
    ),
    max_size=4,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(addons=STRUCTURED_ADDONS, v=JSON)
def test_near_valid_addons_keep_the_keen_object_or_raise_addon_error(addons: Any, v: Any) -> None:
    """Configurations close to valid ones (real names, paths into keen, remove_ip_property):
    enriched with keen.id/timestamp intact, or AddonError."""
    event = {"v": v, "keen": {"timestamp": "2026-01-01T00:00:00Z", "id": "abc", "addons": addons}}
    try:
        run_addons(event)
    except AddonError as exc:
        assert exc.reason
    else:
        assert event["keen"] == {"timestamp": "2026-01-01T00:00:00Z", "id": "abc"}
        orjson.dumps(event)


def outcome(check: Any, addons: Any) -> Any:
    """What a check answers: the (name, input, output) triples, or the AddonError's reason."""
    try:
        return check(addons)
    except AddonError as exc:
        return exc.reason


GEO_REMOVING = [{"name": "keen:ip_to_geo", "input": {"ip": "ip", "remove_ip_property": True}, "output": "geo"}]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=STRUCTURED_ADDONS | st.just(GEO_REMOVING), second=STRUCTURED_ADDONS, numeric=st.sampled_from([1, 1.0]))
def test_the_remembered_check_answers_as_a_fresh_one(first: Any, second: Any, numeric: Any) -> None:
    """``checked_addons`` remembers the last configuration: whatever came before, the next one gets
    the answer a fresh check gives, including one equal to the last under Python's ``==`` only
    (``1 == True``: the one number a configuration holds is the boolean ``remove_ip_property``)."""
    lookalike = [
        {**a, "input": {**a["input"], "remove_ip_property": numeric}}
        if type(a) is dict and type(a.get("input")) is dict and a["input"].get("remove_ip_property") is True
        else a
        for a in first
    ]
    for before, after in ((first, second), (first, first), (first, lookalike), (second, first)):
        outcome(enrichment.checked_addons, before)
        assert outcome(enrichment.checked_addons, after) == outcome(check_addons, after)


def test_a_lookalike_of_the_last_configuration_is_still_refused() -> None:
    assert enrichment.checked_addons(GEO_REMOVING) == check_addons(GEO_REMOVING)
    lookalike = [{**GEO_REMOVING[0], "input": {"ip": "ip", "remove_ip_property": 1}}]
    assert lookalike == GEO_REMOVING
    with pytest.raises(AddonError, match="true or false"):
        enrichment.checked_addons(lookalike)
    event = {"ip": GOOGLE_DNS_V4, "keen": {"addons": lookalike}}
    with pytest.raises(AddonError, match="true or false"):
        run_addons(event)


def test_the_remembered_configuration_is_a_copy_no_event_shares() -> None:
    spec = [addon("keen:url_parser", "parsed", url="u")]
    first = {"u": "http://a.example/x", "keen": {"addons": spec}}
    run_addons(first)
    spec[0]["input"]["url"] = "a..b"  # the event's own list, made invalid after the check
    with pytest.raises(AddonError, match="empty property name"):
        run_addons({"u": "http://b.example/y", "keen": {"addons": [addon("keen:url_parser", "parsed", url="a..b")]}})


NAMES = st.sampled_from(sorted(enrichment.ADDON_INPUTS))
VALUES = st.text(max_size=60) | st.sampled_from(
    [CHROME_UA, IPHONE_UA, GOOGLE_DNS_V6, "http://x/?a=1#b", "2026-01-01T00:00:00Z", "::", "999.1.1.1"]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=NAMES, value=VALUES | JSON)
def test_any_input_value_gives_an_output(name: str, value: Any) -> None:
    """Well-configured add-ons never fail on the values they are given (Keen records blanks)."""
    required, _ = enrichment.ADDON_INPUTS[name]
    event = {"v": value, "keen": {"addons": [{"name": name, "input": dict.fromkeys(required, "v"), "output": "o"}]}}
    run_addons(event)
    assert "o" in event
    orjson.dumps(event)


# --------------------------------------------------------------------------- the sink's hook


def windows() -> PartitionWindows:
    return PartitionWindows(
        "events",
        0,
        window_seconds=60,
        lateness=0,
        max_object_bytes=1 << 30,
        max_event_bytes=100_000,
        max_record_bytes=1_000_000,
        target=lambda project: ("bucket", "prefix"),
        manifest_target=("bucket", "manifests"),
    )


def test_partition_runs_addons_before_writing_and_dead_letters_bad_ones() -> None:
    w = windows()
    good = {"ua": IPHONE_UA, "keen": {"addons": [addon("keen:ua_parser", "parsed", ua_string="ua")]}}
    bad = {"keen": {"addons": [addon("keen:unknown", "x")]}}
    plain = {"n": 1}
    value = orjson.dumps({"project_id": "p1", "collection": "c", "events": [good, bad, plain]})
    w.process(0, 1_764_000_000_000, b"p1", value)
    lines = [orjson.loads(line) for buf in w.open.values() for line in bytes(buf.data).splitlines()]
    assert len(lines) == 2
    assert lines[0]["parsed"]["device"]["family"] == "iPhone" and "addons" not in lines[0]["keen"]
    assert lines[1]["n"] == 1 and "parsed" not in lines[1]
    assert len(w.invalid) == 1 and "event 1: keen.addons[0]: unknown add-on 'keen:unknown'" in w.invalid[0].reason


def test_bad_addons_on_a_too_deep_event_dead_letter_the_record_bytes() -> None:
    w = windows()
    # orjson decodes up to 1024 levels but encodes only 255.
    deep = b"[" * 300 + b"1" + b"]" * 300
    value = b'{"project_id":"p1","collection":"c","event":{"deep":' + deep + b',"keen":{"addons":"not a list"}}}'
    w.process(0, 1_764_000_000_000, b"p1", value)
    assert len(w.invalid) == 1 and w.invalid[0].value == value and "must be a list" in w.invalid[0].reason


# --------------------------------------------------------------------------- API pieces


def test_placeholders_are_filled_anywhere_in_the_event() -> None:
    event = {"ip": "${keen.ip}", "ctx": {"ua": "${keen.user_agent}", "list": ["${keen.ip}", 3]}, "other": "${keen.x}"}
    enrichment.fill_placeholders(event, "203.0.113.7", CHROME_UA)
    assert event == {"ip": "203.0.113.7", "ctx": {"ua": CHROME_UA, "list": ["203.0.113.7", 3]}, "other": "${keen.x}"}


def test_placeholders_in_a_deeply_nested_body_do_not_recurse() -> None:
    deep: Any = ["${keen.ip}"]
    for _ in range(5000):
        deep = [deep]
    enrichment.fill_placeholders({"d": deep}, "203.0.113.7", "ua")
    for _ in range(5000):
        deep = deep[0]
    assert deep == ["203.0.113.7"]


def test_client_ip_believes_x_forwarded_for_only_from_trusted_proxies() -> None:
    trusted = parse_trusted_proxies("10.0.0.0/8, 2001:db8::1")
    # No trusted proxies configured: the peer, whatever the header says.
    assert client_ip("198.51.100.9", "1.2.3.4", ()) == "198.51.100.9"
    # The peer is not a proxy of ours: a forged header is ignored.
    assert client_ip("198.51.100.9", "1.2.3.4", trusted) == "198.51.100.9"
    # Our proxy appended the real client; the client prepended a lie.
    assert client_ip("10.1.2.3", "6.6.6.6, 203.0.113.7", trusted) == "203.0.113.7"
    # Two of our proxies in a row.
    assert client_ip("2001:db8::1", "203.0.113.7, 10.9.9.9", trusted) == "203.0.113.7"
    # Garbage where an address should be: only the peer is believed.
    assert client_ip("10.1.2.3", "not-an-ip", trusted) == "10.1.2.3"
    with pytest.raises(ValueError):
        parse_trusted_proxies("10.0.0.0/8, nonsense")


def test_preflight_allows_keen_sdk_header_and_drops_unknown_ones() -> None:
    headers = keen.preflight_headers({"Access-Control-Request-Headers": "content-type,authorization,keen-sdk,x-evil"})
    allowed = [h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")]
    assert "keen-sdk" in allowed and "authorization" in allowed and "content-type" in allowed
    assert "x-evil" not in allowed
    assert "GET" in headers["Access-Control-Allow-Methods"] and "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Max-Age"] == "86400" and headers["Access-Control-Allow-Origin"] == "*"


def test_beacon_data_decodes_standard_urlsafe_and_unescaped_plus() -> None:
    event = b'{"page":"/?q=\xc3\xa9>>>","n":1}'  # encodes with '+' and '/' in standard base64
    standard = base64.b64encode(event).decode()
    assert "+" in standard or "/" in standard
    assert keen.decode_beacon_data(standard, 10_000) == event
    assert keen.decode_beacon_data(standard.replace("+", " "), 10_000) == event
    assert keen.decode_beacon_data(base64.urlsafe_b64encode(event).decode().rstrip("="), 10_000) == event
    with pytest.raises(ApiError) as missing:
        keen.decode_beacon_data(None, 10_000)
    assert missing.value.status == 400
    with pytest.raises(ApiError) as garbage:
        keen.decode_beacon_data("!!!not base64!!!", 10_000)
    assert garbage.value.status == 400
    with pytest.raises(ApiError) as big:
        keen.decode_beacon_data("A" * 20_000, 10_000)
    assert big.value.status == 413
    assert orjson.loads(big.value.body()).keys() == {"message", "error_code"}


def test_pixel_is_a_one_by_one_gif() -> None:
    gif = keen.PIXEL_GIF
    assert gif.startswith(b"GIF89a") and gif.endswith(b";")
    assert int.from_bytes(gif[6:8], "little") == 1 and int.from_bytes(gif[8:10], "little") == 1
