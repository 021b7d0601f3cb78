"""Sink-health factor and targeted quota tightening. Pure logic."""

from __future__ import annotations

import heapq
import math
from typing import Any

HEALTH_FLOOR = 0.25  # quotas are never tightened below a quarter of normal


def _signal(value: float, threshold: float) -> float:
    if not threshold > 0 or math.isnan(value) or value <= threshold:
        return 1.0
    return threshold / value


def health_factor(
    backlog_age_s: float,
    produce_latency_ms: float,
    *,
    backlog_threshold_s: float,
    latency_threshold_ms: float,
    floor: float = HEALTH_FLOOR,
) -> float:
    """Quota multiplier in (0, 1] from sink backlog age and Kafka produce latency.

    Rule: each signal gives ``1.0`` while ``value <= threshold`` and
    ``threshold / value`` above it; the factor is the worse (smaller) of the
    two, but at least ``floor`` (default 0.25)::

        factor = max(floor, min(f(backlog), f(latency)))

    So a backlog twice the threshold halves the quotas. A NaN value (metric
    not available yet) or a threshold <= 0 disables that signal: quotas are
    not tightened on missing data.
    """
    f = min(
        _signal(backlog_age_s, backlog_threshold_s),
        _signal(produce_latency_ms, latency_threshold_ms),
    )
    return max(floor, f)


def tighten_heaviest(
    rates: dict[str, float],
    quotas: dict[str, float],
    factor: float,
    top_n: int,
    *,
    default: float | None = None,
) -> dict[str, float]:
    """Effective limits: ``quotas`` with only the ``top_n`` heaviest projects scaled by ``factor``.

    "Heaviest" is by absolute rate (the load they put on the sink); only
    projects with rate > 0 qualify; ties break by project id so the result is
    deterministic. Projects in ``rates`` without a quota get ``default`` when it
    is given and are ignored otherwise. ``factor >= 1`` or ``top_n <= 0``
    leaves every limit as it is. The input dicts are not modified.
    """
    out = dict(quotas)
    if default is not None:
        for p in rates:
            out.setdefault(p, default)
    if top_n <= 0 or not factor < 1:
        return out
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    candidates = [p for p in out if rates.get(p, 0.0) > 0]
    for p in heapq.nsmallest(top_n, candidates, key=lambda p: (-rates[p], p)):
        out[p] = out[p] * factor
    return out


def sink_backlog_age(backlog: dict[str, dict[str, Any]], hold_seconds: float, now: float) -> float:
    """Seconds the real-time sink is behind, from ``S3Sink.backlog()``.

    An open window is *meant* to wait ``hold_seconds`` (window + lateness + idle flush) before
    it is written, so only the age past that counts; a partition with unread records also
    counts by how far its watermark (event time) is behind the wall clock, at most for as long as
    its records have been unread (``unread_seconds``). Without that cap the sink's own watermark
    tick, written into a partition idle since the traffic stopped, read as a backlog of everything
    since (the overflow drain, paced by this, fell to its floor every few seconds after a spike).
    """
    worst = 0.0
    for info in backlog.values():
        age = float(info.get("oldest_unflushed_age_seconds") or 0.0) - hold_seconds
        if age > worst:
            worst = age
        watermark = info.get("watermark")
        if info.get("read_lag", 0) > 0 and watermark is not None:
            behind = now - float(watermark) - 1.0
            unread = info.get("unread_seconds")
            worst = max(worst, behind if unread is None else min(behind, float(unread)))
    return max(0.0, worst)


def sink_is_idle(backlog: dict[str, dict[str, Any]]) -> bool:
    """No partition of the real-time sink has an open window or an unread record (``S3Sink.backlog()``):
    nothing there that the overflow drain could delay.

    The drain's pacer remembers the worst backlog age of the last few seconds (an overloaded sink's
    age dips to 0 each time it writes its windows); once the sink has nothing left, that memory only
    held the drain at its floor: ~8 s after the replay's traffic stopped, a fifth of its catch-up."""
    return all(info.get("oldest_open_window") is None and not info.get("read_lag") for info in backlog.values())
