"""Parked destinations without servers: the S3 error classifier, the parked-key layout and the bookkeeping."""

from __future__ import annotations

import asyncio

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from streamapp.metrics import parking_families
from streamapp.settings import Settings
from streamapp.sink.parking_book import (
    ParkedObject,
    ParkedOrigin,
    ParkingBook,
    parked_key,
    parked_root,
    parse_parked_key,
)
from streamapp.sink.s3 import S3Writer
from streamapp.sink.s3_errors import (
    DestinationError,
    ErrorKind,
    classify_exception,
    classify_s3_error,
    error_code_and_status,
)
from streamapp.sink.views import merge_sink

TENANT = ErrorKind.TENANT
TRANSIENT = ErrorKind.TRANSIENT


def client_error(code: str, status: int | None, message: str = "msg") -> ClientError:
    response: dict = {"Error": {"Code": code, "Message": message}}
    if status is not None:
        response["ResponseMetadata"] = {"HTTPStatusCode": status}
    return ClientError(response, "PutObject")


# ------------------------------------------------------------------------------------ classifier
@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("NoSuchBucket", 404, TENANT),
        ("AccessDenied", 403, TENANT),
        ("AllAccessDisabled", 403, TENANT),
        ("PermanentRedirect", 301, TENANT),
        ("KMS.DisabledException", 400, TENANT),
        ("KMS.NotFoundException", 400, TENANT),
        ("KMS.SomethingNewException", 400, TENANT),  # unknown KMS code: the tenant's key
        ("KMS.ThrottlingException", 400, TRANSIENT),
        ("SlowDown", 503, TRANSIENT),
        ("Throttling", 400, TRANSIENT),  # a throttling code wins over a 4xx status
        ("RequestTimeout", 400, TRANSIENT),
        ("InternalError", 500, TRANSIENT),
        ("ServiceUnavailable", 503, TRANSIENT),
        ("RequestTimeTooSkewed", 403, TRANSIENT),  # our clock: every destination fails alike
        ("InvalidAccessKeyId", 403, TRANSIENT),  # our credentials: parking would fail too
        ("SignatureDoesNotMatch", 403, TRANSIENT),
        ("ExpiredToken", 400, TRANSIENT),
        (None, 403, TENANT),  # HEAD-style errors carry only a status
        ("403", 403, TENANT),
        ("404", 404, TENANT),
        (None, 404, TENANT),
        (None, 429, TRANSIENT),
        (None, 500, TRANSIENT),
        (None, 502, TRANSIENT),
        (None, 504, TRANSIENT),
        ("SomethingUnknown", 409, TENANT),
        ("SomethingUnknown", 503, TRANSIENT),
        ("SomethingUnknown", None, TRANSIENT),
        (None, None, TRANSIENT),
    ],
)
def test_classify_s3_error(code: str | None, status: int | None, kind: ErrorKind) -> None:
    assert classify_s3_error(code, status) is kind


def test_classify_exception_reads_client_errors_and_treats_network_errors_as_transient() -> None:
    kind, reason = classify_exception(client_error("NoSuchBucket", 404, "The specified bucket does not exist"))
    assert kind is TENANT
    assert reason == "NoSuchBucket (404): The specified bucket does not exist"
    assert classify_exception(client_error("SlowDown", 503))[0] is TRANSIENT
    assert classify_exception(EndpointConnectionError(endpoint_url="http://x"))[0] is TRANSIENT
    assert classify_exception(ReadTimeoutError(endpoint_url="http://x"))[0] is TRANSIENT
    assert classify_exception(ConnectionResetError("reset"))[0] is TRANSIENT
    # A status-less client error whose code is a number (HEAD answers): the code is the status.
    assert error_code_and_status(ClientError({"Error": {"Code": "404"}}, "HeadObject")) == ("404", 404)
    assert error_code_and_status(ValueError("x")) == (None, None)


# ---------------------------------------------------------------------------------------- keys
def test_parked_keys_round_trip_and_reject_other_keys() -> None:
    root = parked_root("/events/", "app", "topic")
    assert root == "events/_parked/app/topic/"
    assert parked_root("", "app", "topic") == "_parked/app/topic/"
    dest = "tenant-prefix/p1/2026-01-01T00:00:00.000Z/c/p1-c-2026-01-01T00:00:00.000Z-p2-o17.json.gz"
    key = parked_key(root, 2, "p1", "their-bucket", dest)
    obj = parse_parked_key(root, "topic", key, 123)
    assert obj == ParkedObject(key, "topic", 2, "p1", "their-bucket", dest, 123)
    assert parse_parked_key(root, "topic", "events/_manifests/x.json") is None
    assert parse_parked_key(root, "topic", root + "x/p1/b/k") is None  # partition not a number
    assert parse_parked_key(root, "topic", root + "2/p1/b") is None  # no destination key
    assert parse_parked_key(root, "topic", root + "2//b/k") is None


# ------------------------------------------------------------------------------------ bookkeeping
def parked(n: int, project: str = "p", partition: int = 0, size: int = 10) -> ParkedObject:
    return ParkedObject(f"root/{partition}/{project}/b/k{n}", "events", partition, project, "b", f"k{n}", size)


def test_a_parked_tenant_is_retried_after_the_interval_and_clears_when_everything_is_redelivered() -> None:
    book = ParkingBook(retry_seconds=30)
    assert not book.is_parked("p")
    book.parked(parked(1), "NoSuchBucket (404)", now=100)
    book.parked(parked(2, size=5), "NoSuchBucket (404)", now=101)
    book.parked(parked(2, size=5), "NoSuchBucket (404)", now=102)  # a replay parks the same key again
    assert book.is_parked("p")
    assert book.objects_parked == 2
    assert book.totals() == (2, 15)
    state = book.snapshot()["p"]
    assert state["parked"] is True and state["reason"] == "NoSuchBucket (404)" and state["since"] == 100
    assert state["backlog_objects"] == 2 and state["backlog_bytes"] == 15 and state["buckets"] == ["b"]
    assert book.due(129) == []
    assert book.due(130) == ["p"]
    objects = book.attempt_started("p", now=130)
    assert [o.key for o in objects] == ["k1", "k2"]
    assert book.due(131) == [] and book.due(160) == ["p"]
    assert book.redelivered(objects[0]) is False
    assert book.redelivered(objects[0]) is False  # twice: counted once
    book.attempt_failed("p", TENANT, "AccessDenied (403)", now=131)
    assert book.snapshot()["p"]["reason"] == "AccessDenied (403)"
    book.attempt_failed("p", TRANSIENT, "SlowDown (503)", now=132)
    state = book.snapshot()["p"]
    assert state["reason"] == "AccessDenied (403)" and state["last_error"] == "SlowDown (503)"
    assert state["backlog_objects"] == 1 and state["redelivery_attempts"] == 1
    assert book.due(161) == [] and book.due(162) == ["p"]
    assert book.redelivered(objects[1]) is True
    assert not book.is_parked("p") and book.snapshot() == {} and book.totals() == (0, 0)
    assert book.objects_redelivered == 2


def test_retry_now_makes_one_or_every_tenant_due() -> None:
    book = ParkingBook(retry_seconds=1000)
    book.parked(parked(1, "a"), "r", now=0)
    book.parked(parked(1, "b"), "r", now=0)
    assert book.due(1) == []
    assert book.retry_now("a") == ["a"]
    assert book.due(1) == ["a"]
    assert book.retry_now("nobody") == []
    assert sorted(book.retry_now()) == ["a", "b"]
    assert book.due(1) == ["a", "b"]


def test_objects_found_by_listing_are_due_at_once_and_revoked_partitions_are_forgotten() -> None:
    book = ParkingBook(retry_seconds=30)
    book.parked(parked(1, "known", partition=1), "NoSuchBucket (404)", now=50)
    listed = [parked(1, "known", partition=1), parked(3, "fresh", 2), parked(2, "fresh", 2), parked(4, "other", 2)]
    oldest = book.unknown_projects(listed)
    assert oldest == {"fresh": parked(2, "fresh", 2).parked_key, "other": parked(4, "other", 2).parked_key}
    book.discovered(listed, now=60, origins={"fresh": ParkedOrigin("NoSuchBucket (404)", since=10)})
    assert sorted(book.snapshot()) == ["fresh", "known", "other"]
    assert book.due(60) == ["fresh", "other"]  # found after a restart: try now
    assert book.snapshot()["known"]["backlog_objects"] == 1  # the same object listed again is not doubled
    # A project shows up with the reason it was parked for, never without it.
    assert book.snapshot()["fresh"]["reason"] == "NoSuchBucket (404)" and book.snapshot()["fresh"]["since"] == 10
    assert book.snapshot()["other"]["reason"] == ParkedOrigin().reason and book.snapshot()["other"]["since"] == 60
    book.forget_partitions({("events", 1), ("overflow", 2)})
    assert list(book.snapshot()) == ["known"]
    book.forget_partitions(set())
    assert book.snapshot() == {}


def test_parked_state_merges_across_workers_and_metrics_labels_stay_bounded() -> None:
    one = {"parked": {"a": {"backlog_objects": 1}}, "parked_objects": 1, "partitions": {}}
    two = {"parked": {"b": {"backlog_objects": 2}}, "parked_objects": 2, "partitions": {}}
    merged = merge_sink([one, two])
    assert sorted(merged["parked"]) == ["a", "b"] and merged["parked_objects"] == 3

    book = ParkingBook(retry_seconds=30)
    for i in range(5):
        book.parked(parked(1, f"p{i}", size=100 * (i + 1)), "r", now=0)
    families = {f.name: f for f in parking_families(book.snapshot(), book, top_n=2)}
    by_label = {s.labels["project"]: s.value for s in families["streamapp_parked_bytes"].samples}
    assert by_label == {"p4": 500.0, "p3": 400.0, "other": 600.0}
    assert families["streamapp_parked_projects"].samples[0].value == 5
    assert {s.name: s.value for s in families["streamapp_objects_parked"].samples}[
        "streamapp_objects_parked_total"
    ] == 5


# ------------------------------------------------------------------------- S3Writer(tenant=True)
class StubClient:
    """Stands in for boto3's S3 client: fails ``fail`` times with ``error``, then succeeds."""

    def __init__(self, error: Exception, fail: int) -> None:
        self.error = error
        self.fail = fail
        self.calls: list[str] = []

    def put_object(self, **kwargs: object) -> dict:
        self.calls.append("put")
        if self.fail > 0:
            self.fail -= 1
            raise self.error
        return {}


def writer(client: StubClient) -> S3Writer:
    s3 = S3Writer(Settings(s3_retry_max_seconds=0.01))
    s3.client = client
    return s3


def test_a_tenant_error_on_a_tenant_destination_raises_at_once() -> None:
    client = StubClient(client_error("NoSuchBucket", 404), fail=100)
    s3 = writer(client)
    try:
        with pytest.raises(DestinationError, match="NoSuchBucket"):
            asyncio.run(s3.put("theirs", "k", lambda: b"x", "application/gzip", tenant=True))
        assert client.calls == ["put"], "no retry in place"
    finally:
        s3.close()


def test_transient_errors_are_retried_in_place_even_on_a_tenant_destination() -> None:
    client = StubClient(client_error("SlowDown", 503), fail=3)
    s3 = writer(client)
    try:
        assert asyncio.run(s3.put("theirs", "k", lambda: b"xyz", "application/gzip", tenant=True)) == 3
        assert client.calls == ["put"] * 4 and s3.stats.retries == 3
    finally:
        s3.close()


def test_without_the_tenant_flag_every_error_is_retried() -> None:
    client = StubClient(client_error("NoSuchBucket", 404), fail=2)
    s3 = writer(client)
    try:
        assert asyncio.run(s3.put("ours", "k", lambda: b"x", "application/gzip")) == 1
        assert client.calls == ["put"] * 3
    finally:
        s3.close()


def test_sink_parked_table_shows_reason_and_backlog() -> None:
    from streamapp.cli.sink import render_parked

    book = ParkingBook(retry_seconds=30)
    book.parked(parked(1, "tenant", size=2048), "NoSuchBucket (404): gone", now=0)
    table = render_parked(book.snapshot())
    row = table.splitlines()[1]
    assert row.startswith("tenant") and "2048" in row and "NoSuchBucket (404): gone" in row
    assert "(no parked destinations)" in render_parked({})
