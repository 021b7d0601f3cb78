"""Per-project per-second event/byte counts and sliding-window rates.

Pure logic: no clock reads, no I/O. Seconds are integer epoch seconds (>= 0)
of the clock the caller meters by; ``add`` and ``rate`` must use the same
clock (use the arrival / Kafka record timestamp, not the client's event time,
or skewed clients could hide their load in the "future").

Rate definition (``SecondCounts.rate``)
---------------------------------------
At ``now_second`` with ``horizon`` h and ``elapsed`` f (the fraction of the
current second that has passed, in [0, 1]) the window is the seconds::

    lo = max(now_second - h + 1, run_start) .. now_second

``run_start`` is the first second of the project's current activity run: the
second of its first data, reset when data arrives after at least ``size``
silent seconds (an empty ring; such a project is indistinguishable from a new
one). The estimate is::

    rate = sum(counts over window) / max(1.0, (now_second - lo) + f)

i.e. complete seconds count 1 each and the current partial second counts f.
Consequences, on purpose:

* A project that started (or resumed) sending k seconds ago is averaged over
  ~k seconds, not diluted over the whole horizon, so a burst is seen within
  1-2 seconds of data.
* The denominator never drops below 1 second, so a handful of events in the
  first milliseconds is never extrapolated to a huge rate.
* ``elapsed`` defaults to 1.0 (treat the current second as complete): that
  never over-estimates; pass ``now - int(now)`` for the sharper estimate.
* Counts for seconds after ``now_second`` are not included.

``full_window=True`` skips the run-start shortening (``lo = now_second - h + 1``
always): use it for the *sustained* estimate, so that a project that has only
been sending for a few seconds is not judged "sustained over quota" by its
first seconds; the shortened estimate is for the *burst* horizon.

Typical use, once per project per batch::

    burst_eps, burst_bps = counts.rate(sec, settings.burst_horizon_seconds, frac)
    sustained_eps, _ = counts.rate(sec, settings.sustained_horizon_seconds, frac, full_window=True)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

DEFAULT_SIZE = 60  # ring length in seconds = the longest horizon asked for
_EMPTY = -1  # slot marker; real seconds are >= 0


class SecondCounts:
    """Ring of per-second (events, bytes) counts for the last ``size`` seconds."""

    __slots__ = ("_by", "_ev", "_last", "_sec", "_start", "size")

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._sec: list[int] = [_EMPTY] * size  # which second each slot holds
        self._ev: list[int] = [0] * size
        self._by: list[int] = [0] * size
        self._last: int | None = None  # newest second with data
        self._start: int | None = None  # first second of the current activity run

    @property
    def last_second(self) -> int | None:
        """Newest second that has data, or None when nothing was ever added."""
        return self._last

    @property
    def run_start(self) -> int | None:
        """First second of the current activity run (see module docstring)."""
        return self._start

    def add(self, second: int, events: int, nbytes: int) -> bool:
        """Add aggregated counts for ``second``; False when it is too old for the ring.

        "Too old" means ``second <= last_second - size``: its slot already holds
        newer data, so the late counts are dropped rather than corrupting it.
        """
        if events == 0 and nbytes == 0:
            return True  # nothing to record; must not start an activity run
        last = self._last
        size = self.size
        if last is not None and second <= last - size:
            return False
        i = second % size
        if self._sec[i] == second:
            self._ev[i] += events
            self._by[i] += nbytes
        else:  # slot held an older second (or nothing): recycle it
            self._sec[i] = second
            self._ev[i] = events
            self._by[i] = nbytes
        if last is None or second - last >= size:
            self._start = second  # ring was empty: a new activity run
        elif self._start is None or second < self._start:
            self._start = second  # late data inside the ring extends the run backwards
        if last is None or second > last:
            self._last = second
        return True

    def rate(
        self,
        now_second: int,
        horizon: int,
        elapsed: float = 1.0,
        *,
        full_window: bool = False,
    ) -> tuple[float, float]:
        """(events/s, bytes/s) over the last ``horizon`` seconds; see the module docstring."""
        if not 1 <= horizon <= self.size:
            raise ValueError(f"horizon must be in 1..{self.size}, got {horizon}")
        start = self._start
        if start is None:
            return 0.0, 0.0
        lo = now_second - horizon + 1
        if not full_window:
            lo = max(lo, start)
        if lo > now_second:
            return 0.0, 0.0
        size = self.size
        sec, evs, bys = self._sec, self._ev, self._by
        ev = by = 0
        for s in range(lo, now_second + 1):
            i = s % size
            if sec[i] == s:
                ev += evs[i]
                by += bys[i]
        if ev == 0 and by == 0:
            return 0.0, 0.0
        f = min(max(elapsed, 0.0), 1.0)
        span = max(1.0, (now_second - lo) + f)
        return ev / span, by / span

    def counts(self, second: int) -> tuple[int, int]:
        """Raw (events, bytes) recorded for ``second`` (zeros when absent or evicted)."""
        i = second % self.size
        if self._sec[i] == second:
            return self._ev[i], self._by[i]
        return 0, 0

    def series(self, now_second: int, n: int) -> list[tuple[int, int, int]]:
        """(second, events, bytes) for the last ``n`` seconds up to ``now_second``, oldest first.

        ``n`` is clamped to ``0..size``; seconds without data are reported as zeros.
        """
        n = max(0, min(n, self.size))
        out: list[tuple[int, int, int]] = []
        for s in range(now_second - n + 1, now_second + 1):
            e, b = self.counts(s)
            out.append((s, e, b))
        return out

    def merge(self, other: SecondCounts) -> None:
        """Add every second held by ``other`` into this ring (ones too old for it are dropped)."""
        if other._last is None:
            return
        live = [i for i in range(other.size) if other._sec[i] != _EMPTY and other._sec[i] > other._last - other.size]
        # oldest first, so add() sees the run in order
        for i in sorted(live, key=other._sec.__getitem__):
            self.add(other._sec[i], other._ev[i], other._by[i])
        # the merged run began when the earlier of the two still-live runs began
        if (
            other._start is not None
            and self._start is not None
            and self._last is not None
            and other._last > self._last - self.size
            and other._start < self._start
        ):
            self._start = other._start

    def to_dict(self) -> dict[str, Any]:
        """Compact JSON-able form: dense lists ending at the newest second, leading zeros cut.

        ``{"v": 1, "h": size, "t": last_second, "r": run_start, "e": [...], "b": [...]}``
        where ``e[-1]``/``b[-1]`` are the counts of second ``t``.
        """
        d: dict[str, Any] = {"v": 1, "h": self.size}
        last = self._last
        if last is None:
            return d
        ev: list[int] = []
        by: list[int] = []
        for s in range(last - self.size + 1, last + 1):
            e, b = self.counts(s)
            if ev or e or b:
                ev.append(e)
                by.append(b)
        d.update(t=last, r=self._start, e=ev, b=by)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SecondCounts:
        """Inverse of ``to_dict``."""
        c = cls(int(d.get("h", DEFAULT_SIZE)))
        last = d.get("t")
        if last is None:
            return c
        ev = d.get("e") or []
        by = d.get("b") or []
        if len(ev) != len(by) or len(ev) > c.size:
            raise ValueError("SecondCounts.from_dict: bad e/b lists")
        first = int(last) - len(ev) + 1
        for k, (e, b) in enumerate(zip(ev, by, strict=True)):
            if e or b:
                i = (first + k) % c.size
                c._sec[i] = first + k
                c._ev[i] = int(e)
                c._by[i] = int(b)
        c._last = int(last)
        start = d.get("r")
        c._start = int(start) if start is not None else first
        return c

    def __repr__(self) -> str:
        return f"SecondCounts(size={self.size}, last={self._last}, run_start={self._start})"


def merge_counts(*counts: SecondCounts, size: int | None = None) -> SecondCounts:
    """A new ring holding the sum of ``counts`` (e.g. one project seen by several partitions)."""
    if size is None:
        size = max((c.size for c in counts), default=DEFAULT_SIZE)
    out = SecondCounts(size)
    for c in counts:
        out.merge(c)
    return out


def tally(records: Iterable[tuple[str, int, int]]) -> dict[tuple[str, int], list[int]]:
    """Aggregate per-event ``(project_id, second, nbytes)`` into ``{(project, second): [events, bytes]}``.

    The one per-event loop of the meter; feed the result to ``SecondCounts.add``
    so the rings see one call per project-second, not one per event.
    """
    out: dict[tuple[str, int], list[int]] = {}
    get = out.get
    for project, second, nbytes in records:
        key = (project, second)
        acc = get(key)
        if acc is None:
            out[key] = [1, nbytes]
        else:
            acc[0] += 1
            acc[1] += nbytes
    return out
