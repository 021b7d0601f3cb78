"""Unit tests of the Prometheus metrics: bounded project labels, scrape-time series, text format.

The scrape sources here are plain stand-ins with the few attributes the collector reads; the
end-to-end check against a real worker is in tests/web/test_views_integration.py.
"""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamapp.metering import OTHER, BoundedProjectCounters
from streamapp.metrics import Metrics, overflow_backlog_by_partition
from streamapp.sink.s3 import S3Stats

OUTCOMES = ("received", "admitted", "diverted", "dropped", "bytes")


def _counts(received: int, admitted: int | None = None) -> dict[str, int]:
    admitted = received if admitted is None else admitted
    return {
        "received": received,
        "admitted": admitted,
        "diverted": received - admitted,
        "dropped": 0,
        "bytes": 10 * received,
    }


def _sum(c: BoundedProjectCounters, outcome: str) -> float:
    i = c.outcomes.index(outcome)
    return sum(values[i] for values in c.totals.values())


def test_labels_bounded_with_10000_projects_and_totals_exact() -> None:
    c = BoundedProjectCounters(top_n=20)
    rng = random.Random(1)
    counters = {f"p{i}": _counts(rng.randint(1, 1000)) for i in range(10_000)}
    top = sorted(counters, key=lambda p: -counters[p]["received"])
    labelled = c.update(counters, top)
    assert len(labelled) == 20
    assert set(c.totals) == {*labelled, OTHER}
    assert _sum(c, "received") == sum(v["received"] for v in counters.values())
    assert _sum(c, "bytes") == sum(v["bytes"] for v in counters.values())
    for project in labelled:
        assert c.totals[project][0] == counters[project]["received"]


def test_series_stay_monotonic_when_the_top_changes() -> None:
    c = BoundedProjectCounters(top_n=2)
    counters = {"a": _counts(100), "b": _counts(50), "c": _counts(10)}
    c.update(counters, ["a", "b", "c"])
    before = {k: list(v) for k, v in c.totals.items()}
    # c spikes into the top, b drops out of it
    counters = {"a": _counts(110), "b": _counts(55), "c": _counts(500)}
    labelled = c.update(counters, ["c", "a", "b"])
    assert labelled == ["c", "a"]
    assert "b" not in c.totals  # its series is dropped: the label set stays bounded
    assert c.totals["a"][0] == 110
    assert c.totals["c"][0] == 490  # only the increase since it got its label; 10 stayed in other
    assert c.totals[OTHER][0] == before[OTHER][0] + 5  # b's increase went to other
    assert c.totals[OTHER][0] >= before[OTHER][0]
    # b's 50 left with its series; the unlabelled all-projects counter keeps the exact total
    assert _sum(c, "received") == 110 + 490 + 15
    assert c.all_projects[0] == 110 + 55 + 500


def test_counter_reset_counts_new_value_and_other_never_decreases() -> None:
    c = BoundedProjectCounters(top_n=1)
    c.update({"a": _counts(100), "b": _counts(40)}, ["a"])
    other = c.totals[OTHER][0]
    c.update({"a": _counts(100), "b": _counts(5)}, ["a"])  # b's state was rebuilt from 0
    assert c.totals[OTHER][0] == other + 5
    c.update({"a": _counts(100)}, ["a"])  # b's partition revoked: forgotten, its counts stay
    assert c.totals[OTHER][0] == other + 5


def test_project_named_other_never_gets_a_label_of_its_own() -> None:
    c = BoundedProjectCounters(top_n=3)
    labelled = c.update({"other": _counts(7), "x": _counts(3)}, ["other", "x"])
    assert labelled == ["x"]
    assert c.totals[OTHER][0] == 7


class _Meter:
    def __init__(self, n: int) -> None:
        rng = random.Random(3)
        self.data = {f"project-{i}": _counts(rng.randint(1, 100)) for i in range(n)}
        self.data["hot"] = _counts(100_000, 30_000)

    def top(self, limit: int) -> list[dict[str, Any]]:
        ranked = sorted(self.data, key=lambda p: -self.data[p]["received"])[:limit]
        return [
            {
                "project_id": p,
                "eps_burst": self.data[p]["received"] / 10,
                "bps_burst": 0.0,
                "eps_sustained": 1.0,
                "bps_sustained": 0.0,
                "quota_eps": 1000.0,
                "quota_bps": 2e6,
                "state": "shed" if p == "hot" else "ok",
                "mode": "divert",
                "counters": self.data[p],
            }
            for p in ranked
        ]

    def counters(self) -> dict[str, dict[str, int]]:
        return self.data

    def shed(self) -> dict[str, Any]:
        return {"shed": [{"project_id": "hot", "state": "shed", "mode": "divert"}], "episodes": []}

    def series(self, project_id: str, seconds: int) -> list[dict[str, int]]:
        return []


def _drain_status() -> dict[str, Any]:
    return {"backlog": {"0": 12, "1": {"backlog": 3}}, "drain_rate": 250.0}


class _Sink:
    pending_bytes = 1234
    events_in = 99
    invalid_out = 1

    def backlog(self) -> dict[str, dict[str, Any]]:
        return {
            str(p): {
                "read_lag": p,
                "offsets_behind": 10 * p,
                "oldest_unflushed_age_seconds": 1.5 * p,
                "open_windows": 1,
            }
            for p in range(4)
        }


def _runtime(n_projects: int) -> SimpleNamespace:
    """The scrape sources (``streamapp.metrics.ScrapeSources``): no parking book (its series are skipped)."""
    return SimpleNamespace(
        meter=_Meter(n_projects),
        sink=_Sink(),
        s3=SimpleNamespace(stats=S3Stats(objects=5, bytes=500, retries=2, errors=2), on_put=[]),
        parking=None,
        drain_status=_drain_status,
    )


def _scrape(metrics: Metrics) -> dict[str, Any]:
    text = generate_latest(metrics.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_text_parses_and_label_count_stays_bounded_with_10000_projects() -> None:
    metrics = Metrics(top_n=20)
    runtime = _runtime(10_000)
    metrics.bind(runtime)  # type: ignore[arg-type]
    metrics.bind(runtime)  # type: ignore[arg-type] - idempotent
    assert runtime.s3.on_put == [metrics.observe_put]
    runtime.s3.on_put[0](0.2)
    metrics.observe_http("/rates/", "GET", 200, 0.003)
    for _ in range(2):  # a second scrape must not grow anything
        families = _scrape(metrics)
        projects = set()
        for family in families.values():
            for sample in family.samples:
                if "project" in sample.labels:
                    projects.add(sample.labels["project"])
        assert len(projects) <= 21
        assert OTHER in projects and "hot" in projects
        received = families["streamapp_project_events_received"]
        total = sum(s.value for s in received.samples if s.name.endswith("_total"))
        assert total == sum(v["received"] for v in runtime.meter.data.values())  # nothing dropped out yet
        exact = families["streamapp_all_projects_events_received"].samples[0].value
        assert exact == total
        diverted = {s.labels["project"]: s.value for s in families["streamapp_project_events_diverted"].samples}
        assert diverted["hot"] == 70_000
        shed = {s.labels["project"]: s.value for s in families["streamapp_project_shed"].samples}
        assert shed["hot"] == 1 and sum(shed.values()) == 1
        assert families["streamapp_projects_shed"].samples[0].value == 1
    lag = {s.labels["partition"]: s.value for s in families["streamapp_consumer_lag"].samples}
    assert lag == {"0": 0, "1": 1, "2": 2, "3": 3}
    age = {s.labels["partition"]: s.value for s in families["streamapp_oldest_unflushed_age_seconds"].samples}
    assert age["3"] == 4.5
    assert families["streamapp_s3_errors"].samples[0].value == 2
    assert families["streamapp_s3_retries"].samples[0].value == 2
    overflow = {s.labels["partition"]: s.value for s in families["streamapp_overflow_backlog"].samples}
    assert overflow == {"0": 12, "1": 3}
    assert families["streamapp_overflow_drain_rate"].samples[0].value == 250
    put = {s.name: s.value for s in families["streamapp_s3_put_seconds"].samples if not s.labels.get("le")}
    assert put["streamapp_s3_put_seconds_count"] == 1
    http = [s for s in families["streamapp_http_request_seconds"].samples if s.name.endswith("_count")]
    assert http[0].labels == {"route": "/rates/", "method": "GET", "status": "200"} and http[0].value == 1


def test_a_failing_source_does_not_break_the_scrape() -> None:
    metrics = Metrics()
    runtime = _runtime(3)

    def broken() -> dict[str, Any]:
        raise RuntimeError("consumer not started")

    runtime.sink.backlog = broken
    metrics.bind(runtime)  # type: ignore[arg-type]
    families = _scrape(metrics)
    assert "streamapp_consumer_lag" not in families
    assert "streamapp_project_events_received" in families


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({"backlog": {"0": 5, "2": 7}}, {"0": 5.0, "2": 7.0}),
        ({"partitions": {"1": {"backlog": 4}, "3": {"lag": 2}}}, {"1": 4.0, "3": 2.0}),
        ({"drain_rate": 3.0}, {}),
    ],
)
def test_overflow_backlog_shapes(status: dict[str, Any], expected: dict[str, float]) -> None:
    assert overflow_backlog_by_partition(status) == expected
