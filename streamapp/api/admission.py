"""Admission of a shed project's writes: the shed decision from the replicated control view, the
local token bucket (no burst, may go into debt) and the ``Retry-After`` of a refusal. Pure: time
is passed in."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streamapp.api.errors import TOO_MANY_REQUESTS, ApiError
from streamapp.metering.bucket import TokenBucket
from streamapp.metering.shed import ShedState, retry_after_seconds


@dataclass(frozen=True, slots=True)
class Shed:
    """A project whose excess is being rejected: its admitted rate, why, and the Retry-After seconds."""

    limit_eps: float
    reason: str
    retry_after: int


def shed_decision(
    project_id: str,
    state: Mapping[str, Any] | None,
    override: Mapping[str, Any] | None,
    *,
    quota_eps: float | None,
    default_eps: float,
    now: float,
    cooldown: float,
) -> Shed | None:
    """Is ``project_id`` shed (and enforcing) according to the replicated control view?

    * an operator "unshed" override wins: not shed;
    * a shed state from the meters (``ShedState.to_dict()``), unless in shadow mode: shed at the
      state's ``limit_eps`` (else the project's quota, else the default);
    * an operator "shed" override not yet turned into a shed state by a meter: shed at the quota.

    ``now`` is epoch seconds (the meters' clock); ``Retry-After`` comes from
    :func:`streamapp.metering.shed.retry_after_seconds`.
    """
    action = override.get("action") if override else None
    if action == "unshed":
        return None
    fallback_limit = quota_eps if quota_eps and quota_eps > 0 else default_eps
    if state and state.get("state") == "shed":
        if state.get("mode") == "shadow":
            return None
        try:
            parsed = ShedState.from_dict({**state, "project_id": project_id})
        except (TypeError, ValueError):
            parsed = ShedState(project_id, state="shed")
        limit = parsed.limit_eps if parsed.limit_eps > 0 else fallback_limit
        # The meter's state says only "manual shed": the operator's own words stay the answer's
        # reason once the meter has taken the override over, as they were before.
        reason = _manual_reason(override) if action == "shed" and parsed.manual == "shed" else parsed.reason or "shed"
        return Shed(limit, reason, retry_after_seconds(parsed, now, cooldown))
    if action == "shed":
        if override and override.get("mode") == "shadow":
            return None
        manual = ShedState(project_id, state="shed", manual="shed")
        return Shed(fallback_limit, _manual_reason(override), retry_after_seconds(manual, now, cooldown))
    return None


def _manual_reason(override: Mapping[str, Any] | None) -> str:
    reason = str(override.get("reason") or "manual shed") if override else "manual shed"
    return f"manual shed: {reason}"


def bucket_for(limit_eps: float) -> TokenBucket:
    """The local bucket of a shed project: ``limit_eps`` tokens/s and no stored burst (one token).

    No burst on purpose: a shed project is over its quota already, and a stored second's worth
    would let it pass ``limit x (T + 1)`` events in T seconds instead of ``limit x T`` plus one
    request.
    """
    return TokenBucket(rate=limit_eps, capacity=1.0)


def admit(bucket: TokenBucket, now: float, n: int) -> bool:
    """Admit a whole request of ``n`` events, charging ``n`` tokens, or refuse it and charge nothing.

    A request is admitted while the bucket holds a token; it then costs all its events, so the
    bucket may go into debt and refuses everything until the refill has paid the debt back.
    Over any span T the admitted events are at most ``rate x T`` plus one request, whatever
    the batch sizes.
    """
    if bucket.wait_time(now, 1) > 0:
        bucket.take(now, 0)  # keep the time origin moving
        return False
    bucket.charge(now, max(1, n))
    return True


def can_admit_any(bucket: TokenBucket, now: float) -> bool:
    """Cheap pre-check before reading the body: is there a token (no debt left)?"""
    return bucket.wait_time(now, 1) <= 0


def retry_after_for(bucket: TokenBucket, now: float, shed: Shed) -> int:
    """Retry-After seconds of a refused request: at least the time the bucket needs to pay its debt."""
    wait = bucket.wait_time(now, 1)
    if not math.isfinite(wait):
        return shed.retry_after
    return max(1, math.ceil(wait))


def shed_error(project_id: str, shed: Shed, retry_after: int | None = None) -> ApiError:
    """The 429 answer for a shed project's excess (``retry_after`` defaults to the shed's own)."""
    if retry_after is not None:
        shed = Shed(shed.limit_eps, shed.reason, retry_after)
    return ApiError(
        429,
        TOO_MANY_REQUESTS,
        f"project {project_id} is over its limit and being shed ({shed.reason}); "
        f"admitted rate {shed.limit_eps:g} events/s",
        headers={"Retry-After": str(shed.retry_after)},
        extra={"reason": shed.reason, "retry_after": shed.retry_after, "limit_eps": shed.limit_eps},
    )
