"""Quotas, the per-project shed state machine and deterministic event sampling.

Pure logic: time is always passed in (float seconds), nothing reads a clock.

State machine (``step``)
------------------------
* ok -> shed when the burst rate exceeds the quota plus tolerance, in events
  (``burst_eps > eps * (1 + burst)``) or bytes (``burst_bps > bps * (1 + burst)``),
  or when the sustained rate exceeds the plain quota (``sustained_eps > eps``:
  the tolerance is for bursts, not for running over quota all the time).
  ``sustained_eps`` should be the full-window estimate
  (``SecondCounts.rate(..., full_window=True)``) so a brand-new project is not
  judged on its first seconds; ``burst_*`` the run-start-shortened one.
* shed -> ok only after the project has been *below* for ``cooldown`` seconds
  continuously. Below means ``burst_eps < eps * exit_ratio`` and
  ``burst_bps < bps * exit_ratio`` and ``sustained_eps <= eps`` (the last so an
  exit can never re-trigger the sustained entry rule on the next step).
  ``below_since`` holds the ``now`` of the first step of the current below run;
  any step that is not below resets it. The band between the exit and entry
  thresholds is the hysteresis that stops flapping.
* ``manual`` = "shed" / "unshed" forces the state and wins over rates until it
  is cleared (``set_manual(state, None, now)``); ``below_since`` keeps being
  tracked under a manual shed so that clearing it after a quiet period lets the
  next ``step`` unshed at once.
* ``mode`` is carried through untouched: the state machine runs the same for
  divert, drop and shadow; the caller decides what "shed" does
  (``ShedState.enforcing`` is False in shadow mode).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .vocabulary import MANUAL_OVERRIDES, SHED_MODES, SHED_STATES

# The vocabulary's values under this module's historical names (streamapp.metering.vocabulary).
STATES = SHED_STATES
MODES = SHED_MODES
MANUAL = MANUAL_OVERRIDES

# admit_fraction never returns 0 so an admitted share always exists; tiny enough
# that even 1e9 ev/s against a 1 ev/s quota is not over-admitted.
MIN_ADMIT_FRACTION = 1e-9

_M64 = (1 << 64) - 1
_TWO64 = 1 << 64


@dataclass(frozen=True)
class Quota:
    """Per-project limits: events/s, bytes/s and the burst tolerance fraction."""

    eps: float
    bps: float
    burst: float = 0.5

    def __post_init__(self) -> None:
        if not (self.eps >= 0 and self.bps >= 0 and self.burst >= 0):
            raise ValueError(f"Quota fields must be >= 0: {self}")

    @property
    def enter_eps(self) -> float:
        """Burst events/s above which a project is shed."""
        return self.eps * (1.0 + self.burst)

    @property
    def enter_bps(self) -> float:
        """Burst bytes/s above which a project is shed."""
        return self.bps * (1.0 + self.burst)

    @classmethod
    def from_settings(cls, settings: Any) -> Quota:
        """The default quota from a ``Settings`` (duck-typed to keep this module import-free)."""
        return cls(
            eps=float(settings.default_eps_limit),
            bps=float(settings.default_bps_limit),
            burst=float(settings.burst_tolerance),
        )


def effective_quota(quota: Quota, health_factor: float) -> Quota:
    """``quota`` with eps and bps scaled by ``health_factor`` in (0, 1]; burst tolerance kept.

    Factors above 1 are clamped to 1 (health never loosens a quota).
    """
    if not health_factor > 0:
        raise ValueError(f"health_factor must be > 0, got {health_factor}")
    if health_factor >= 1.0:
        return quota
    return Quota(eps=quota.eps * health_factor, bps=quota.bps * health_factor, burst=quota.burst)


@dataclass(frozen=True, slots=True)  # one per metered project: no __dict__
class ShedState:
    """Shed state of one project; frozen and JSON-able via ``to_dict``/``from_dict``.

    ``observed_*`` and ``limit_*`` are the evidence at the last transition (the
    rates that caused it, and the project's quota then); they are deliberately
    not refreshed on every step so that an unchanged state stays the same
    object and the table is only written on real changes. Current rates come
    from the meter, not from here.
    """

    project_id: str
    state: str = "ok"
    mode: str = "divert"
    since: float = 0.0  # time of the last ok<->shed transition
    reason: str = ""
    observed_eps: float = 0.0
    observed_bps: float = 0.0
    limit_eps: float = 0.0
    limit_bps: float = 0.0
    below_since: float | None = None
    manual: str | None = None
    episode: int = 0  # number of ok->shed transitions so far

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {self.state!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.manual not in MANUAL:
            raise ValueError(f"manual must be one of {MANUAL}, got {self.manual!r}")

    @property
    def is_shed(self) -> bool:
        return self.state == "shed"

    @property
    def enforcing(self) -> bool:
        """True when events must actually be diverted/dropped (shed and not shadow mode)."""
        return self.state == "shed" and self.mode != "shadow"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShedState:
        """Inverse of ``to_dict``; unknown keys are ignored (forward compatible)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _over(burst_eps: float, burst_bps: float, sustained_eps: float, quota: Quota) -> str | None:
    """Why the rates call for shedding, or None."""
    if burst_eps > quota.enter_eps:
        return f"rate {burst_eps:.1f} ev/s > limit {quota.enter_eps:.1f} ev/s"
    if burst_bps > quota.enter_bps:
        return f"rate {burst_bps:.1f} B/s > limit {quota.enter_bps:.1f} B/s"
    if sustained_eps > quota.eps:
        return f"sustained rate {sustained_eps:.1f} ev/s > quota {quota.eps:.1f} ev/s"
    return None


def step(
    state: ShedState,
    *,
    now: float,
    burst_eps: float,
    burst_bps: float,
    sustained_eps: float,
    quota: Quota,
    cooldown: float,
    exit_ratio: float,
) -> ShedState:
    """Advance the state machine (see the module docstring) for the rates seen at ``now``.

    Returns a new ``ShedState`` when anything changed, and the very same object
    (``is state``) when nothing did, so callers can skip the table write with
    ``if new is not old``. Pure and deterministic.
    """
    exit_eps = quota.eps * exit_ratio
    exit_bps = quota.bps * exit_ratio
    below = burst_eps < exit_eps and burst_bps < exit_bps and sustained_eps <= quota.eps

    if state.manual == "unshed":
        if state.state == "shed":
            return _to_ok(state, now, "manual unshed", burst_eps, burst_bps, quota)
        return state
    if state.manual == "shed":
        if state.state != "shed":
            return _to_shed(
                state,
                now,
                "manual shed",
                burst_eps,
                burst_bps,
                quota,
                below_since=now if below else None,
            )
        return _track_below(state, now, below)

    if state.state == "ok":
        why = _over(burst_eps, burst_bps, sustained_eps, quota)
        if why is None:
            return state
        return _to_shed(state, now, why, burst_eps, burst_bps, quota, below_since=None)

    # shed: wait for `cooldown` seconds of continuous below
    tracked = _track_below(state, now, below)
    since = tracked.below_since
    if since is not None and now - since >= cooldown:
        why = f"rate {burst_eps:.1f} ev/s < {exit_eps:.1f} ev/s for {now - since:.1f} s"
        return _to_ok(tracked, now, why, burst_eps, burst_bps, quota)
    return tracked


def _track_below(state: ShedState, now: float, below: bool) -> ShedState:
    if below:
        return state if state.below_since is not None else replace(state, below_since=now)
    return state if state.below_since is None else replace(state, below_since=None)


def _to_shed(
    state: ShedState,
    now: float,
    why: str,
    eps: float,
    bps: float,
    quota: Quota,
    *,
    below_since: float | None,
) -> ShedState:
    return replace(
        state,
        state="shed",
        since=now,
        reason=why,
        observed_eps=eps,
        observed_bps=bps,
        limit_eps=quota.eps,
        limit_bps=quota.bps,
        below_since=below_since,
        episode=state.episode + 1,
    )


def _to_ok(state: ShedState, now: float, why: str, eps: float, bps: float, quota: Quota) -> ShedState:
    return replace(
        state,
        state="ok",
        since=now,
        reason=why,
        observed_eps=eps,
        observed_bps=bps,
        limit_eps=quota.eps,
        limit_bps=quota.bps,
        below_since=None,
    )


def set_manual(state: ShedState, manual: str | None, now: float) -> ShedState:
    """Set or clear the manual override, applying a forced transition at once.

    "shed" sheds now (new episode), "unshed" unsheds now, None clears the
    override and leaves the state as it is for the next ``step`` to judge.
    Returns ``state`` itself when nothing changes.
    """
    if manual not in MANUAL:
        raise ValueError(f"manual must be one of {MANUAL}, got {manual!r}")
    if manual == state.manual:
        return state
    new = replace(state, manual=manual)
    if manual == "shed" and state.state != "shed":
        new = replace(
            new,
            state="shed",
            since=now,
            reason="manual shed",
            below_since=None,
            episode=state.episode + 1,
        )
    elif manual == "unshed" and state.state == "shed":
        new = replace(new, state="ok", since=now, reason="manual unshed", below_since=None)
    return new


def with_mode(state: ShedState, mode: str) -> ShedState:
    """``state`` with another shed mode (same object when unchanged)."""
    return state if state.mode == mode else replace(state, mode=mode)


def admit_fraction(observed_eps: float, limit_eps: float) -> float:
    """Share in (0, 1] of a project's events to admit so that admitted ≈ ``limit_eps``.

    1.0 when the project is at or under its limit; never below ``MIN_ADMIT_FRACTION``.
    """
    if not observed_eps > limit_eps:  # also catches NaN observed and observed <= 0
        return 1.0
    if not limit_eps > 0:
        return MIN_ADMIT_FRACTION
    return max(MIN_ADMIT_FRACTION, limit_eps / observed_eps)


def mix64(x: int) -> int:
    """SplitMix64 finalizer of ``x`` (taken mod 2**64): a fast, well-mixed 64-bit hash.

    STABILITY CONTRACT: ``admit_event`` decisions derive from this function, and
    replays / other workers must reach the same decisions for the same
    positions. Never change the constants or the algorithm; tests pin outputs.
    """
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def admit_threshold(fraction: float) -> int:
    """Hash threshold for ``fraction``: an event is admitted when ``mix64(position) < threshold``."""
    if not fraction > 0:
        return 0
    if fraction >= 1.0:
        return _TWO64
    return int(fraction * _TWO64)


def admit_event(position: int, fraction: float) -> bool:
    """Deterministic, stateless sampling: admit the event at ``position`` with probability ``fraction``.

    ``position`` should identify the event stably across replays, e.g. its Kafka
    offset (mix in the partition, e.g. ``partition << 48 | offset``, if the
    same decision for equal offsets of different partitions matters). The
    admitted share over many positions ≈ ``fraction``. Stable across versions:
    see ``mix64``.
    """
    return mix64(position) < admit_threshold(fraction)


def admit_many(positions: Iterable[int], fraction: float) -> list[bool]:
    """``admit_event`` for a batch, computing the threshold once."""
    t = admit_threshold(fraction)
    if t == 0:
        return [False for _ in positions]
    if t == _TWO64:
        return [True for _ in positions]
    return [mix64(p) < t for p in positions]


def retry_after_seconds(state: ShedState, now: float, cooldown: float) -> int:
    """Seconds (>= 1) for an HTTP 429 ``Retry-After`` header.

    The earliest time the project could be unshed: the rest of the cooldown when
    it is already below the exit threshold, otherwise a full cooldown. For a
    project that is not shed (or for a manual shed, whose end is unknown, a
    full cooldown) the value is still >= 1.
    """
    if state.state != "shed":
        return 1
    remaining = cooldown
    if state.manual is None and state.below_since is not None:
        remaining = cooldown - (now - state.below_since)
    if not math.isfinite(remaining):
        return 1
    return max(1, math.ceil(remaining))
