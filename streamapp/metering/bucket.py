"""Token bucket (HTTP admission of a shed project's share) and the overflow drain pacer.

Pure logic: ``now`` is always passed in (float seconds, any monotonic clock);
a ``now`` earlier than the last one seen is treated as "no time passed".
"""

from __future__ import annotations

import math

_EPS = 1e-9  # absorbs float error so 3 refilled tokens are not seen as 2.9999999


class TokenBucket:
    """Continuous-refill token bucket: ``rate`` tokens/s, at most ``capacity`` stored.

    Starts full (``tokens`` overrides). The first call only sets the time origin.
    """

    __slots__ = ("capacity", "last", "rate", "tokens")

    def __init__(self, rate: float, capacity: float, tokens: float | None = None) -> None:
        if not rate >= 0:
            raise ValueError(f"rate must be >= 0, got {rate}")
        if not capacity > 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self.rate = float(rate)
        self.capacity = float(capacity)
        self.tokens = self.capacity if tokens is None else min(float(tokens), self.capacity)
        self.last: float | None = None

    def _level(self, now: float) -> float:
        """Tokens available at ``now`` without changing the bucket."""
        if self.last is None or now <= self.last:
            return self.tokens
        return min(self.capacity, self.tokens + (now - self.last) * self.rate)

    def _refill(self, now: float) -> None:
        self.tokens = self._level(now)
        if self.last is None or now > self.last:
            self.last = now

    def take(self, now: float, n: int = 1) -> int:
        """Admit up to ``n`` events now; returns how many were admitted (0..n)."""
        self._refill(now)  # also on n <= 0, so take(now, 0) sets the time origin
        if n <= 0:
            return 0
        k = min(n, int(self.tokens + _EPS))
        if k > 0:
            self.tokens = max(0.0, self.tokens - k)
        return k

    def charge(self, now: float, n: int) -> None:
        """Take ``n`` tokens now even when fewer are stored: the bucket goes into debt (negative
        tokens), which later refills must pay back before anything else is admitted."""
        self._refill(now)
        if n > 0:
            self.tokens -= n

    def wait_time(self, now: float, n: int = 1) -> float:
        """Seconds until ``n`` tokens are available (0.0 if they are now).

        ``n`` above ``capacity`` is clamped to it (the most one call can ever
        get); ``inf`` when the rate is 0 and the tokens are short. A bucket in debt
        (see :meth:`charge`) waits for the debt too.
        """
        need = min(float(n), self.capacity) - self._level(now)
        if need <= _EPS:
            return 0.0
        if self.rate <= 0:
            return math.inf
        return need / self.rate

    def set_rate(self, now: float, rate: float, capacity: float | None = None) -> None:
        """Change the refill rate (and capacity) at ``now``; tokens up to ``now`` accrue at the old rate."""
        if not rate >= 0:
            raise ValueError(f"rate must be >= 0, got {rate}")
        self._refill(now)
        self.rate = float(rate)
        if capacity is not None:
            if not capacity > 0:
                raise ValueError(f"capacity must be > 0, got {capacity}")
            self.capacity = float(capacity)
            self.tokens = min(self.tokens, self.capacity)

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate}, capacity={self.capacity}, tokens={self.tokens:.3f})"


class Pacer:
    """Paces the overflow drain so it yields to real-time traffic but never starves.

    ``allowance`` is ``max_rate`` when the real-time backlog age is 0 and falls
    linearly to ``floor_fraction * max_rate`` as the age reaches
    ``health_threshold`` (and stays there beyond it); never 0.

    The gap after a delivery of ``n`` events is ``n / allowance`` at the allowance in force when
    the drain *asks* (``wait_seconds``), not when it delivered: a gap judged at the floor rate would
    hold a 5,000-event chunk back ~15 s after the real-time backlog is gone (the replay's drain sat
    idle for 24 s after a spike), and one judged at the full rate would not yield when a backlog
    builds during the wait. The drain asks again every few hundred milliseconds while it waits.

    The waits use the worst backlog age seen in the last ``memory_seconds`` (slow to speed up, quick
    to yield): an overloaded sink's backlog age dips to 0 for a moment each time its windows are
    written, and a drain that went at full rate in every dip would keep the sink overloaded.

    The time the drain spent reading and cutting a delivery's events counts toward their share
    (``started(..., working_since=)``), as long as it comes after the previous delivery's share:
    otherwise a drain whose reading takes as long as its share would wait that share again after
    reading (it ran at ~16,000 events/s, half its 32,000 allowance, after the replay's spike).
    """

    __slots__ = ("_ages", "_due", "_last", "floor_fraction", "max_rate", "memory_seconds")

    def __init__(self, max_rate: float, floor_fraction: float = 0.05, memory_seconds: float = 5.0) -> None:
        if not max_rate > 0:
            raise ValueError(f"max_rate must be > 0, got {max_rate}")
        if not 0 < floor_fraction <= 1:
            raise ValueError(f"floor_fraction must be in (0, 1], got {floor_fraction}")
        self.max_rate = float(max_rate)
        self.floor_fraction = float(floor_fraction)
        self.memory_seconds = float(memory_seconds)
        self._last: tuple[float, int] | None = None  # (start, events) of the last delivery
        self._due: float | None = None  # when the last delivery's share ends, as last asked
        self._ages: list[tuple[float, float]] = []  # (when, backlog age) seen in the last memory_seconds

    def allowance(self, now: float, backlog_age_seconds: float, health_threshold: float) -> float:
        """Drain rate in events/s for the current backlog age.

        A NaN age (sink health unknown) is treated as at the threshold: drain
        at the floor rather than flood a sink of unknown state. A threshold <= 0
        disables scaling. ``now`` is accepted for a uniform call shape; the
        allowance depends only on the backlog age.
        """
        del now  # stateless in time on purpose
        if not health_threshold > 0:
            return self.max_rate
        if math.isnan(backlog_age_seconds):
            pressure = 1.0
        else:
            pressure = min(1.0, max(0.0, backlog_age_seconds) / health_threshold)
        return self.max_rate * (1.0 - (1.0 - self.floor_fraction) * pressure)

    def wait_seconds(self, now: float, backlog_age_seconds: float, health_threshold: float) -> float:
        """Seconds until the next delivery may start, at the current allowance (0: go now).

        The first delivery after an idle spell goes at once; idle time earns no credit, so the
        drain never bursts above the allowance.
        """
        age = self._observe(now, backlog_age_seconds)
        if self._last is None:
            return 0.0
        start, events = self._last
        rate = self.allowance(now, age, health_threshold)
        self._due = start + events / rate
        return max(0.0, self._due - now)

    def recent_age(self, now: float, backlog_age_seconds: float) -> float:
        """The worst backlog age seen in the last ``memory_seconds``, ``backlog_age_seconds`` included
        (NaN, health unknown, is kept as is: ``allowance`` treats it as at the threshold).

        A pure read (views call it); ``wait_seconds`` records the ages it is given."""
        if math.isnan(backlog_age_seconds):
            return backlog_age_seconds
        recent = [a for t, a in self._ages if now - t < self.memory_seconds]
        recent.append(backlog_age_seconds)
        return max(recent)

    def _observe(self, now: float, backlog_age_seconds: float) -> float:
        """``recent_age``, keeping ``backlog_age_seconds`` among the ages seen."""
        if math.isnan(backlog_age_seconds):
            return backlog_age_seconds
        self._ages = [(t, a) for t, a in self._ages if now - t < self.memory_seconds]
        self._ages.append((now, backlog_age_seconds))
        return max(a for _, a in self._ages)

    def started(self, n_events: int, now: float, working_since: float | None = None) -> None:
        """A delivery of ``n_events`` starts at ``now``: the next one waits for its share of time.

        ``working_since``: when the drain began reading these events. Its share then counts from
        that time, or from the end of the previous delivery's share if later (idle time before the
        work began earns no credit), never from after ``now``."""
        start = now
        if working_since is not None:
            if self._last is None:  # the first delivery (after a reset)
                start = min(now, working_since)
            elif self._due is not None:  # the previous share, as ``wait_seconds`` last judged it
                start = min(now, max(working_since, self._due))
        self._last = (start, max(0, n_events))
        self._due = None  # judged again by the next ``wait_seconds``

    def forget_ages(self) -> None:
        """Forget the backlog ages seen: the sink has nothing left that the drain could delay."""
        self._ages = []

    def reset(self) -> None:
        """Forget the last delivery and the ages seen (e.g. after a rebalance)."""
        self._last = None
        self._due = None
        self._ages = []
