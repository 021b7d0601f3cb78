"""The meter's decisions: quotas and shed modes from the control view, the shed state machine run
for the projects counted (or watched), shed markers and control records queued in the outbox,
episodes, and the health-aware tightening of the heaviest projects' quotas.

Synchronous: a decision and what it queues can never interleave with another one; the outbox
is carried out by ``streamapp.metering.publishing``. ``MeterDecisions`` is one part of
``streamapp.metering.service.Meter``, which holds the state.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .health import health_factor, sink_backlog_age, tighten_heaviest
from .project_meter import ProjectMeter, round_finite
from .shed import Quota, ShedState, admit_fraction, effective_quota, set_manual, step, with_mode
from .vocabulary import SHED_MODES

if TYPE_CHECKING:
    import faust

    from streamapp.control import ControlPlane
    from streamapp.settings import Settings
    from streamapp.sink import S3Sink

    from .publishing import Outbox

# A shed project's admit fraction is re-announced (new shed marker) when it moves by more than this.
FRACTION_CHANGE = 0.15
# Horizon (s) of the rate that sizes the admitted share while shed: short, so shaping follows the load.
SHAPING_HORIZON_SECONDS = 3
# The current second's count so far, over at least this share of a second, also sizes the share: a
# climbing spike outruns any rate of whole seconds (see ``decide``).
CURRENT_SECOND_MIN_ELAPSED = 0.25
# Records of a second are assumed complete this long after it ended (fetch + batch delay).
CONSUMER_LAG_SECONDS = 0.5
# A partition whose newest counted record is further behind the clock than this, while records keep
# coming, is metered on its records' clock (``record_lag``); an idle one stays on the wall clock.
RECORD_LAG_TOLERANCE_SECONDS = 2
RECORD_CLOCK_IDLE_SECONDS = 2.0
# Kafka produce latency (mean of the last sends) above which limits tighten, like the sink backlog.
PRODUCE_LATENCY_THRESHOLD_MS = 500.0
# Health-aware limits tighten only the heaviest projects.
HEALTH_TOP_N = 3
# Decisions wait for the control view (quotas, overrides) at most this long after start.
CONTROL_GRACE_SECONDS = 10.0


class MeterDecisions:
    """Quotas, the state machine, episodes and health of the ``Meter`` (its state: see ``Meter.__init__``)."""

    app: faust.App
    settings: Settings
    control: ControlPlane
    sink: S3Sink
    ready: bool
    started_at: float
    burst_h: int
    sustained_h: int
    shaping_h: int
    projects: dict[str, ProjectMeter]
    record_clock: dict[int, tuple[int, float]]
    episodes: deque[dict[str, Any]]
    health: dict[str, float]
    tightened: dict[str, float]
    default_quota: Quota
    _out: Outbox
    _watched: dict[str, ProjectMeter]

    def quota_for(self, project_id: str) -> Quota:
        """The configured quota (per-project settings from the control topic, else the defaults)."""
        s = self.settings
        project = self.control.view.projects.get(project_id)
        if project is None:
            return self.default_quota
        return Quota(
            float(project.quota_eps) if project.quota_eps is not None else s.default_eps_limit,
            float(project.quota_bps) if project.quota_bps is not None else s.default_bps_limit,
            float(project.burst) if project.burst is not None else s.burst_tolerance,
        )

    def effective_quota(self, project_id: str) -> Quota:
        """``quota_for`` tightened by the health factor when the project is among the heaviest."""
        quota = self.quota_for(project_id)
        factor = self.tightened.get(project_id)
        return effective_quota(quota, factor) if factor is not None else quota

    def mode_for(self, project_id: str) -> str:
        view = self.control.view
        override = view.overrides.get(project_id)
        if override is not None and override.get("action") == "shed" and override.get("mode") in SHED_MODES:
            return str(override["mode"])
        project = view.projects.get(project_id)
        if project is not None and project.shed_mode in SHED_MODES:
            return str(project.shed_mode)
        return self.settings.shed_mode

    def can_decide(self) -> bool:
        if not self.ready:
            return False
        control = self.control
        return control.caught_up.is_set() or time.monotonic() - self.started_at > CONTROL_GRACE_SECONDS

    def record_lag(self, partition: int, now: float) -> int:
        """Seconds the records now being counted on ``partition`` are behind ``now`` (0 if caught up).

        Rates are counted by record timestamp. While the consumer is behind (a backlog), the
        records counted now are seconds old, so rates over the last seconds of the wall clock
        would see none: the project would look quiet, its admitted share would be 1 and its whole
        backlog would be exported on time, which deepens the backlog (the 2019 spiral). So a
        partition that is behind is metered at the clock of its newest counted record. A far-future
        record timestamp is capped at the clock when counted, so a producer can only make its
        partition look caught up (the wall clock), never further behind.
        """
        clock = self.record_clock.get(partition)
        if clock is None:
            return 0
        newest, counted_at = clock
        if not 0 <= now - counted_at <= RECORD_CLOCK_IDLE_SECONDS:
            return 0  # nothing counted lately (or only after ``now``): caught up and quiet
        lag = int(now) - newest
        return lag if lag > RECORD_LAG_TOLERANCE_SECONDS else 0

    def decide(self, pms: list[ProjectMeter], now: float) -> None:
        """Run the state machine for ``pms`` at ``now``; queue markers and control records."""
        s = self.settings
        now_sec = int(now)
        elapsed = now - now_sec
        overrides = self.control.view.overrides
        out = self._out
        watched, tightened = self._watched, self.tightened
        for pm in pms:
            counts = pm.counts
            if pm.project_id not in watched and pm.project_id not in overrides and pm.project_id not in tightened:
                # Not shed, nothing manual: the state machine can only shed it, and no rate over
                # any horizon exceeds what its ring holds (spans are >= 1 s). Far below its quota
                # (thousands of one-event projects), there is nothing to decide.
                quota = self.quota_for(pm.project_id)
                if (
                    counts.events_held <= quota.eps
                    and counts.events_held <= quota.enter_eps
                    and counts.bytes_held <= quota.enter_bps
                ):
                    continue
            lag = self.record_lag(pm.partition, now)
            at_sec = now_sec - lag  # the metering clock of its partition
            pm.eps_burst, pm.bps_burst = counts.rate(at_sec, self.burst_h, elapsed)
            pm.eps_sustained, pm.bps_sustained = counts.rate(at_sec, self.sustained_h, elapsed, full_window=True)
            # The admitted share is sized by the larger of the rate over the last complete seconds
            # (stable: records of the current second are still arriving) and the rate including
            # the current second (quick to see a jump).
            recent_eps, recent_bps = counts.rate(at_sec, self.shaping_h, elapsed)
            complete_eps, complete_bps = counts.rate(int(now - lag - CONSUMER_LAG_SECONDS) - 1, self.shaping_h)
            pm.eps_shaping = max(recent_eps, complete_eps)
            bps_shaping = max(recent_bps, complete_bps)
            if lag == 0:
                # While a spike climbs, the 3 s rates trail it by ~1.5 s and the share they size
                # admits 2-3x the quota (replays of 2026-12-04: 52,000 events on time in the spike's
                # first 6 s at a quota of 2,625/s), every event of it exported on time at the
                # others' expense. Fresher: the last second (the current one so far and the rest
                # from the one before) and the current second so far extrapolated to a whole one.
                # Taking the largest can only admit less, which costs the shed project (delayed,
                # not lost), never the others.
                current_events, current_bytes = counts.counts(at_sec)
                previous_events, previous_bytes = counts.counts(at_sec - 1)
                part = max(elapsed, CURRENT_SECOND_MIN_ELAPSED)
                rest = 1.0 - elapsed  # of the second before: not counted yet in the last second
                pm.eps_shaping = max(pm.eps_shaping, current_events / part, current_events + previous_events * rest)
                bps_shaping = max(bps_shaping, current_bytes / part, current_bytes + previous_bytes * rest)
            quota = self.effective_quota(pm.project_id)
            pm.limit_eps, pm.limit_bps = quota.eps, quota.bps
            override = overrides.get(pm.project_id)
            manual = override.get("action") if override is not None else None
            old = pm.state
            new = with_mode(old, self.mode_for(pm.project_id))
            new = set_manual(new, manual if manual in ("shed", "unshed") else None, now)
            new = step(
                new,
                now=now,
                burst_eps=pm.eps_burst,
                burst_bps=pm.bps_burst,
                sustained_eps=pm.eps_sustained,
                quota=quota,
                cooldown=s.shed_cooldown_seconds,
                exit_ratio=s.shed_exit_ratio,
            )
            if new.is_shed:
                pm.fraction = min(admit_fraction(pm.eps_shaping, quota.eps), admit_fraction(bps_shaping, quota.bps))
                pm.fraction = float(f"{pm.fraction:.6g}")
                if not old.is_shed or new.episode != old.episode:
                    pm.peak_eps = pm.eps_burst
                    self.episodes.append(self._episode(pm, new))
                elif pm.eps_burst > pm.peak_eps:
                    pm.peak_eps = pm.eps_burst
                want: tuple[str, float] | None = (new.mode, pm.fraction)
            else:
                pm.fraction = 1.0
                if old.is_shed:
                    self._close_episode(pm, new)
                want = None
            marker_changed = self._marker_differs(pm.marker, want)
            if marker_changed:
                pm.marker = want
                out.markers.append((pm, want))
            if new is not old or marker_changed:
                pm.state = new
                self._watch(pm)
                out.rows[pm.project_id] = pm
                significant = (
                    new.state != old.state
                    or new.mode != old.mode
                    or new.manual != old.manual
                    or new.episode != old.episode
                )
                if significant or marker_changed:
                    out.published.append(self._state_record(pm))

    @staticmethod
    def _marker_differs(current: tuple[str, float] | None, want: tuple[str, float] | None) -> bool:
        if current is None or want is None:
            return current != want
        if current[0] != want[0]:
            return True
        old_fraction, new_fraction = current[1], want[1]
        if old_fraction <= 0:
            return True
        return abs(new_fraction - old_fraction) > FRACTION_CHANGE * old_fraction

    def _state_record(self, pm: ProjectMeter) -> dict[str, Any]:
        state = pm.state.to_dict()
        # Extra keys (ShedState.from_dict ignores them): what the API tier shows without a hop.
        state.update(
            current_eps=round_finite(pm.eps_burst),
            current_bps=round_finite(pm.bps_burst),
            effective_limit_eps=round_finite(pm.limit_eps, 3),
            admit_fraction=pm.fraction,
            partition=pm.partition,
        )
        return {"type": "shed_state", "project_id": pm.project_id, "state": state}

    def _episode(self, pm: ProjectMeter, state: ShedState | None = None, recovered: bool = False) -> dict[str, Any]:
        state = state or pm.state
        episode = {
            "project_id": pm.project_id,
            "episode": state.episode,
            "start": state.since,
            "end": None,
            "reason": state.reason,
            "mode": state.mode,
            "peak_eps": round_finite(pm.peak_eps),
        }
        if recovered:
            episode["recovered"] = True
        return episode

    def _close_episode(self, pm: ProjectMeter, state: ShedState) -> None:
        for episode in reversed(self.episodes):
            if episode["project_id"] == pm.project_id and episode["end"] is None:
                episode["end"] = state.since
                episode["end_reason"] = state.reason
                episode["peak_eps"] = round_finite(pm.peak_eps)
                return

    # --------------------------------------------------------------- health
    def update_health(self, now: float) -> None:
        s = self.settings
        try:
            backlog = self.sink.backlog()
        except Exception:  # noqa: BLE001 - consumer not ready yet: no signal
            backlog = {}
        age = sink_backlog_age(backlog, s.window_seconds + s.allowed_lateness_seconds + s.idle_flush_seconds, now)
        latencies = list(self.app.monitor.send_latency)[-50:]
        latency_ms = 1000.0 * sum(latencies) / len(latencies) if latencies else float("nan")
        factor = health_factor(
            age,
            latency_ms,
            backlog_threshold_s=s.health_backlog_seconds,
            latency_threshold_ms=PRODUCE_LATENCY_THRESHOLD_MS,
        )
        self.health = {"factor": factor, "backlog_age_seconds": round(age, 3), "produce_latency_ms": latency_ms}
        if factor >= 1.0:
            self.tightened = {}
            return
        # Only the heaviest can be tightened: rank the projects with data in the burst horizon by
        # their current rate, and hand tighten_heaviest just those (not every project's quota).
        now_sec = int(now)
        active = [pm for pm in self.projects.values() if (pm.counts.last_second or -1) > now_sec - self.burst_h]
        current = {pm.project_id: pm.counts.rate(now_sec, self.burst_h, now - now_sec)[0] for pm in active}
        heaviest = heapq.nsmallest(HEALTH_TOP_N, current, key=lambda p: (-current[p], p))
        rates = {p: current[p] for p in heaviest}
        quotas = {p: self.quota_for(p).eps for p in rates}
        limits = tighten_heaviest(rates, quotas, factor, HEALTH_TOP_N)
        self.tightened = {p: factor for p, limit in limits.items() if limit < quotas[p]}
