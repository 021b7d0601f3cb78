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
    """Ring of per-second (events, bytes) counts for the last ``size`` seconds.

    Memory: a ring that has only ever held one second at a time (a project that sent one
    record, the common case of a bug that invents project ids) keeps that second inline and
    allocates its three ``size``-long lists (~1.6 KB at size 60) only when a second distinct
    second arrives within the ring. ``_tot`` is the sum of every slot's events, so
    ``rate_bound`` is O(1) (the views rank 100,000 projects without computing every rate).
    """

    __slots__ = ("_by", "_by1", "_ev", "_ev1", "_last", "_sec", "_start", "_tob", "_tot", "size")

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        # The three lists: which second each slot holds, its events and bytes; None while inline.
        self._sec: list[int] | None = None
        self._ev: list[int] | None = None
        self._by: list[int] | None = None
        self._ev1 = 0  # inline (lists not allocated): the counts of second ``_last``
        self._by1 = 0
        self._tot = 0  # events over every slot (an upper bound of any window's events)
        self._tob = 0  # bytes over every slot
        self._last: int | None = None  # newest second with data
        self._start: int | None = None  # first second of the current activity run

    @property
    def last_second(self) -> int | None:
        """Newest second that has data, or None when nothing was ever added."""
        return self._last

    @property
    def events_held(self) -> int:
        """Events in the ring's slots: no rate over any horizon exceeds it (spans are >= 1 s)."""
        return self._tot

    @property
    def bytes_held(self) -> int:
        """Bytes in the ring's slots: no rate over any horizon exceeds it (spans are >= 1 s)."""
        return self._tob

    @property
    def run_start(self) -> int | None:
        """First second of the current activity run (see module docstring)."""
        return self._start

    def _materialize(self) -> tuple[list[int], list[int], list[int]]:
        """Allocate the lists, moving the inline second into its slot."""
        size = self.size
        sec, ev, by = [_EMPTY] * size, [0] * size, [0] * size
        if self._last is not None:
            i = self._last % size
            sec[i], ev[i], by[i] = self._last, self._ev1, self._by1
        self._sec, self._ev, self._by = sec, ev, by
        self._ev1 = self._by1 = 0
        return sec, ev, by

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
        secs = self._sec
        if secs is None:
            if last is None or second - last >= size:  # empty ring: a new activity run, inline
                self._ev1, self._by1, self._tot, self._tob = events, nbytes, events, nbytes
                self._last = self._start = second
                return True
            if second == last:
                self._ev1 += events
                self._by1 += nbytes
                self._tot += events
                self._tob += nbytes
                return True
            secs = self._materialize()[0]
        evs, bys = self._ev, self._by
        assert evs is not None and bys is not None
        i = second % size
        if secs[i] == second:
            evs[i] += events
            bys[i] += nbytes
            self._tot += events
            self._tob += nbytes
        else:  # slot held an older second (or nothing): recycle it
            self._tot += events - evs[i]
            self._tob += nbytes - bys[i]
            secs[i] = second
            evs[i] = events
            bys[i] = nbytes
        if last is None or second - last >= size:
            self._start = second  # ring was empty: a new activity run
        elif self._start is None or second < self._start:
            self._start = second  # late data inside the ring extends the run backwards
        if last is None or second > last:
            self._last = second
        return True

    def rate_bound(self, now_second: int, horizon: int, elapsed: float = 1.0) -> float:
        """An upper bound of ``rate(now_second, horizon, elapsed)[0]`` in O(1).

        The same span as ``rate`` (shortened window), over every event the ring holds: exact
        when all of them are inside the window (e.g. a project that sent within one second),
        0.0 exactly when the newest data is older than the window.
        """
        start, last = self._start, self._last
        if start is None or last is None:
            return 0.0
        lo = max(now_second - horizon + 1, start)
        if lo > now_second or last < lo:
            return 0.0
        f = min(max(elapsed, 0.0), 1.0)
        return self._tot / max(1.0, (now_second - lo) + f)

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
        sec, evs, bys = self._sec, self._ev, self._by
        if sec is None or evs is None or bys is None:  # inline: one second
            last = self._last
            in_window = last is not None and lo <= last <= now_second
            ev, by = (self._ev1, self._by1) if in_window else (0, 0)
        else:
            size = self.size
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
        sec, evs, bys = self._sec, self._ev, self._by
        if sec is None or evs is None or bys is None:
            return (self._ev1, self._by1) if second == self._last else (0, 0)
        i = second % self.size
        if sec[i] == second:
            return evs[i], bys[i]
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
        osec, oev, oby = other._sec, other._ev, other._by
        if osec is None or oev is None or oby is None:
            self.add(other._last, other._ev1, other._by1)
        else:
            live = [i for i in range(other.size) if osec[i] != _EMPTY and osec[i] > other._last - other.size]
            # oldest first, so add() sees the run in order
            for i in sorted(live, key=osec.__getitem__):
                self.add(osec[i], oev[i], oby[i])
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
                c.add(first + k, int(e), int(b))  # oldest first: stays inline when one second has data
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
