"""From what one arm observed (request log, events found in S3, shed samples) to its figures and series.

Pure functions of their inputs: no clock, no I/O. Times are epoch seconds; series are per second
since the traffic started (``t0``). Event ids are ``project index << 32 | sequence``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from streamapp.replay.measure import KIND_DELAYED, KIND_LATE, KIND_ON_TIME, ObjectEvents
from streamapp.replay.scenario import Scenario
from streamapp.replay.traffic import CHANNELS, ID_SHIFT, KAFKA_ACKED

REFUSED_STATUSES = (400, 401, 404, 413, 429)


@dataclass
class RequestTable:
    """The generator's request log as arrays (see ``traffic.RequestLog``)."""

    due: np.ndarray
    latency: np.ndarray
    project: np.ndarray
    channel: np.ndarray
    status: np.ndarray
    first: np.ndarray
    n: np.ndarray
    ok: np.ndarray

    @classmethod
    def load(cls, path: str) -> RequestTable:
        data = np.load(path)
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})

    def mask(self, keep: np.ndarray) -> RequestTable:
        return RequestTable(**{name: getattr(self, name)[keep] for name in self.__dataclass_fields__})


def expand_ids(project: np.ndarray, first: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Every id of the ranges ``[first, first + n)`` of each row."""
    if len(n) == 0:
        return np.zeros(0, np.int64)
    total = int(n.sum())
    starts = np.repeat((project.astype(np.int64) << ID_SHIFT) | first.astype(np.int64), n)
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    return starts + offsets


#: The calibration's rate is the slope between the first samples that have read these shares of
#: the backlog: the first records are read with cold caches (the add-ons' parsers meet every user
#: agent for the first time), the last ones as the backlog runs out; neither is the sustained rate.
BACKLOG_READ_SPAN = (0.2, 0.9)
#: Below this share of the backlog left to read when the producer stopped, the producer was the
#: bottleneck (the sink kept up with it) and the rate is only a lower bound.
MIN_BACKLOG_LEFT = 0.5


def backlog_rate(samples: list[tuple[float, int]], accepted: int) -> float:
    """Events/s at which the worker's sink read the calibration's backlog of ``accepted`` events.

    ``samples``: (seconds since the producer started, events read), the first taken as it stopped.
    The slope between the first samples that have read each share of ``BACKLOG_READ_SPAN`` (from
    the first sample if the sink had read more than the lower share by then); if less than
    ``MIN_BACKLOG_LEFT`` of the backlog was left when the producer stopped, the events read per
    second from the start (what the producer let the sink show)."""
    if accepted <= 0 or not samples or samples[-1][1] <= 0:
        raise RuntimeError(f"calibration: the worker's sink read none of the {accepted} events accepted")
    low, high = (share * accepted for share in BACKLOG_READ_SPAN)
    start_t, start_read = next((s for s in samples if s[1] >= low), samples[0])
    end_t, end_read = next((s for s in samples if s[1] >= high), samples[-1])
    if accepted - samples[0][1] >= MIN_BACKLOG_LEFT * accepted and end_t > start_t and end_read > start_read:
        return (end_read - start_read) / (end_t - start_t)
    last_t, last_read = samples[-1]
    return min(last_read, accepted) / max(last_t, 1e-3)


def percentiles(values: np.ndarray) -> dict[str, float | int | None]:
    if len(values) == 0:
        return {"p50": None, "p99": None, "max": None, "count": 0}
    return {
        "p50": round(float(np.percentile(values, 50)), 3),
        "p99": round(float(np.percentile(values, 99)), 3),
        "max": round(float(values.max()), 3),
        "count": int(len(values)),
    }


def isin_sorted(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_ids)`` for ``sorted_ids`` in ascending order: one binary search per
    value. ``np.isin`` hashes both arrays: the analysis of a protected arm of a million events took
    1.22 s with it and takes 0.14 s with this, after the traffic, on the replay's critical path."""
    if len(sorted_ids) == 0:
        return np.zeros(len(values), bool)
    at = np.minimum(np.searchsorted(sorted_ids, values), len(sorted_ids) - 1)
    return np.asarray(sorted_ids[at] == values)


def first_delivery(events: ObjectEvents) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct id: (id, event time, earliest visible time, kind of that copy)."""
    if len(events.ids) == 0:
        empty = np.zeros(0)
        return empty.astype(np.int64), empty, empty, empty.astype(np.int8)
    order = np.lexsort((events.visible, events.ids))
    ids = events.ids[order]
    first = np.ones(len(ids), bool)
    first[1:] = ids[1:] != ids[:-1]
    return ids[first], events.event_time[order][first], events.visible[order][first], events.kind[order][first]


def api_figures(table: RequestTable) -> dict[str, Any]:
    """Success rate, latency and status counts of HTTP writes."""
    http = table.channel != CHANNELS.index("kafka")
    status = table.status[http]
    latency_ms = table.latency[http] * 1000
    ok = (status == 200) | (status == 201)
    total = int(len(status))
    return {
        "requests": total,
        "success_rate": round(float(ok.mean()), 6) if total else None,
        "p50_ms": round(float(np.percentile(latency_ms, 50)), 2) if total else None,
        "p99_ms": round(float(np.percentile(latency_ms, 99)), 2) if total else None,
        "count_429": int((status == 429).sum()),
        "count_503": int((status == 503).sum()),
        "no_answer": int((status == 0).sum()),
    }


def analyse_arm(
    scenario: Scenario,
    table: RequestTable,
    events: ObjectEvents,
    shed_periods: list[tuple[float, float]],
    shed_decisions: list[float],
    t0: float,
    *,
    shed_mode: str,
    settled: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary of one arm, its per-second series for the plots)."""
    spiker = 0  # the spiking project is index 0
    spike_start, spike_end = t0 + scenario.spike_start, t0 + scenario.spike_end
    end = t0 + scenario.traffic_seconds

    acked = table.ok > 0
    accepted_ids = expand_ids(table.project[acked], table.first[acked], table.ok[acked])
    accepted_due = np.repeat(table.due[acked], table.ok[acked])
    refused = np.isin(table.status, REFUSED_STATUSES)
    refused_ids = expand_ids(table.project[refused], table.first[refused], table.n[refused])

    ids, etime, visible, kind = first_delivery(events)  # each distinct id once, sorted
    accepted_found = isin_sorted(accepted_ids, ids)
    missing = int((~accepted_found).sum())
    duplicated = len(events.ids) - len(ids)  # copies beyond the first of every id
    acknowledged = isin_sorted(ids, np.sort(accepted_ids))  # of the ids in S3
    unacknowledged = int((~acknowledged).sum())
    refused_in_s3 = int(isin_sorted(refused_ids, ids).sum())
    project = ids >> ID_SHIFT
    latency = visible - etime

    def delivery(sel: np.ndarray) -> dict[str, Any]:
        return percentiles(latency[sel])

    others = project != spiker
    phases = {
        "before": (etime >= t0) & (etime < spike_start),
        "during": (etime >= spike_start) & (etime < spike_end),
        "after": (etime >= spike_end) & (etime < end),
    }
    other_delivery = {name: delivery(others & sel) for name, sel in phases.items()}
    other_requests = table.mask(table.project != spiker)
    in_spike = (other_requests.due >= spike_start) & (other_requests.due < spike_end)
    spiker_requests = table.mask(table.project == spiker)
    spiker_in_spike = spiker_requests.mask((spiker_requests.due >= spike_start) & (spiker_requests.due < spike_end))

    # Spiking project: detection, in-quota latency, catch-up of everything it had accepted in the spike.
    # The meter's own decision time (``since``) when it was seen, else when the poller first saw it shed.
    decided = [t for t in shed_decisions if t >= spike_start - 1]
    seen = [s for s, e in shed_periods if e >= spike_start]
    detection = (decided[0] if decided else seen[0]) - spike_start if (decided or seen) else None
    spiker_spike = (project == spiker) & phases["during"]
    realtime = spiker_spike & (kind != KIND_DELAYED)
    delayed = (project == spiker) & (kind == KIND_DELAYED)
    spiker_accepted = (accepted_ids >> ID_SHIFT) == spiker
    spike_accepted_due = accepted_due[spiker_accepted]
    spike_accepted_n = int(((spike_accepted_due >= spike_start) & (spike_accepted_due < spike_end)).sum())
    catch_up = float(visible[spiker_spike].max() - spike_end) if spiker_spike.any() else None
    drain: dict[str, Any] = {"events": int(delayed.sum())}
    if delayed.sum() > 1:
        span = float(visible[delayed].max() - visible[delayed].min())
        rate = float(delayed.sum()) / max(span, 1.0)  # visible times: to the second
        drain.update(
            first_visible_seconds=round(float(visible[delayed].min() - spike_start), 2),
            last_visible_seconds=round(float(visible[delayed].max() - spike_start), 2),
            rate_eps=round(rate, 1),
            multiple_of_live_rate=round(rate / scenario.derived["quota_eps"], 2),
        )
    summary = {
        "shed_mode": shed_mode,
        "settled": settled,
        "events": {
            "produced": int(table.n.sum()),
            "accepted": int(len(accepted_ids)),
            "in_s3": int(accepted_found.sum()),
            "on_time": int((kind == KIND_ON_TIME).sum()),
            "late": int((kind == KIND_LATE).sum()),
            "delayed": int((kind == KIND_DELAYED).sum()),
            "missing": missing,
            "duplicated": duplicated,
            "dropped_by_policy": missing if shed_mode == "drop" else 0,
            "refused_at_api": int(table.n[refused].sum()),
            "unacknowledged_in_s3": unacknowledged,
            "refused_in_s3": refused_in_s3,
            "exactly_once": missing == 0 and duplicated == 0 and refused_in_s3 == 0,
        },
        "other_projects": {
            "delivery_seconds": {**other_delivery["during"], "by_phase": other_delivery},
            "api": {**api_figures(other_requests.mask(in_spike)), "whole_run": api_figures(other_requests)},
            "kafka_acked_rate": _kafka_ack_rate(other_requests),
        },
        "spiking_project": {
            "detection_seconds": round(detection, 2) if detection is not None else None,
            "shed_seen_seconds": round(seen[0] - spike_start, 2) if seen else None,
            "shed_periods_seconds": [[round(s - t0, 2), round(e - t0, 2)] for s, e in shed_periods],
            "in_quota_delivery_seconds": delivery(realtime),
            "catch_up_seconds": round(catch_up, 2) if catch_up is not None else None,
            "accepted_during_spike": spike_accepted_n,
            "drain": drain,
            "api": api_figures(spiker_in_spike),
        },
    }
    return summary, _series(scenario, table, acknowledged, accepted_due, ids, etime, visible, kind, t0)


def _kafka_ack_rate(table: RequestTable) -> float | None:
    kafka = table.channel == CHANNELS.index("kafka")
    if not kafka.any():
        return None
    return round(float((table.status[kafka] == KAFKA_ACKED).mean()), 6)


def _series(
    scenario: Scenario,
    table: RequestTable,
    acknowledged: np.ndarray,
    accepted_due: np.ndarray,
    ids: np.ndarray,
    etime: np.ndarray,
    visible: np.ndarray,
    kind: np.ndarray,
    t0: float,
) -> dict[str, Any]:
    """Per-second series (x: seconds since the traffic started) for the plots; ``acknowledged``:
    which of the ids found in S3 (``ids``) were accepted."""
    horizon = int(max(scenario.traffic_seconds, (visible.max() - t0) if len(visible) else 0)) + 2
    seconds = np.arange(horizon)

    def per_second(times: np.ndarray, weights: np.ndarray | None = None) -> list[float]:
        bins = np.clip((times - t0).astype(np.int64), 0, horizon - 1)
        return np.bincount(bins, weights=weights, minlength=horizon).tolist()

    spiker = table.project == 0
    offered = {
        "spiking": per_second(table.due[spiker], table.n[spiker].astype(float)),
        "others": per_second(table.due[~spiker], table.n[~spiker].astype(float)),
    }
    accepted = {
        "spiking": per_second(table.due[spiker], table.ok[spiker].astype(float)),
        "others": per_second(table.due[~spiker], table.ok[~spiker].astype(float)),
    }
    # Other projects' delivery latency by second of event time (p50, p99).
    others = (ids >> ID_SHIFT) != 0
    lat = visible[others] - etime[others]
    sec = (etime[others] - t0).astype(np.int64)
    p50: list[float | None] = []
    p99: list[float | None] = []
    order = np.argsort(sec, kind="stable")
    sec_sorted, lat_sorted = sec[order], lat[order]
    bounds = np.searchsorted(sec_sorted, np.arange(horizon + 1))
    for s in seconds:
        chunk = lat_sorted[bounds[s] : bounds[s + 1]]
        p50.append(round(float(np.percentile(chunk, 50)), 3) if len(chunk) else None)
        p99.append(round(float(np.percentile(chunk, 99)), 3) if len(chunk) else None)
    # Export backlog: accepted events whose event time has passed but that are not visible yet.
    due_sorted = np.sort(accepted_due)
    realtime_visible = np.sort(visible[acknowledged & (kind != KIND_DELAYED)])
    delayed_visible = np.sort(visible[acknowledged & (kind == KIND_DELAYED)])
    edges = t0 + seconds + 1
    backlog = (
        np.searchsorted(due_sorted, edges)
        - np.searchsorted(realtime_visible, edges)
        - np.searchsorted(delayed_visible, edges)
    )
    # API success and p99 by second, for the other projects' HTTP writes.
    http_other = (~spiker) & (table.channel != CHANNELS.index("kafka"))
    api_sec = (table.due[http_other] - t0).astype(np.int64)
    api_ok = np.isin(table.status[http_other], (200, 201))
    api_lat = table.latency[http_other] * 1000
    success: list[float | None] = []
    api_p99: list[float | None] = []
    for s in seconds:
        sel = api_sec == s
        success.append(round(float(api_ok[sel].mean()), 5) if sel.any() else None)
        api_p99.append(round(float(np.percentile(api_lat[sel], 99)), 2) if sel.any() else None)
    return {
        "seconds": seconds.tolist(),
        "offered_eps": offered,
        "accepted_eps": accepted,
        "other_delivery_p50": p50,
        "other_delivery_p99": p99,
        "export_backlog": np.maximum(backlog, 0).tolist(),
        "other_api_success": success,
        "other_api_p99_ms": api_p99,
        "late_events": int((kind == KIND_LATE).sum()),
    }
