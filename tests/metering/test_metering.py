"""Unit tests of the pure metering logic (streamapp.metering)."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from streamapp.metering import (
    MIN_ADMIT_FRACTION,
    Pacer,
    Quota,
    SecondCounts,
    ShedState,
    TokenBucket,
    admit_event,
    admit_fraction,
    admit_many,
    admit_threshold,
    effective_quota,
    health_factor,
    merge_counts,
    mix64,
    retry_after_seconds,
    set_manual,
    step,
    tally,
    tighten_heaviest,
    with_mode,
)
from streamapp.settings import Settings

T0 = 1_700_000_000  # a realistic epoch second

# ---------------------------------------------------------------- rates


def test_empty_counts_rate_is_zero() -> None:
    c = SecondCounts(60)
    assert c.rate(T0, 10) == (0.0, 0.0)
    assert c.last_second is None and c.run_start is None
    assert c.series(T0, 3) == [(T0 - 2, 0, 0), (T0 - 1, 0, 0), (T0, 0, 0)]


def test_steady_rate_over_full_horizon() -> None:
    c = SecondCounts(60)
    for s in range(T0, T0 + 120):
        assert c.add(s, 100, 10_000)
    # 10 complete-or-current seconds, current counted as complete (elapsed=1.0)
    assert c.rate(T0 + 119, 10) == (100.0, 10_000.0)
    assert c.rate(T0 + 119, 60) == (100.0, 10_000.0)


def test_add_accumulates_within_second() -> None:
    c = SecondCounts(60)
    c.add(T0, 3, 30)
    c.add(T0, 4, 40)
    assert c.counts(T0) == (7, 70)
    assert c.counts(T0 + 60) == (0, 0)  # same slot, other second


def test_new_project_not_diluted_over_horizon() -> None:
    c = SecondCounts(60)
    c.add(T0, 2000, 0)
    c.add(T0 + 1, 2000, 0)
    # run started at T0: averaged over 2 seconds, not 10 or 60
    assert c.rate(T0 + 1, 10) == (2000.0, 0.0)
    assert c.rate(T0 + 1, 60) == (2000.0, 0.0)


def test_first_partial_second_not_extrapolated() -> None:
    c = SecondCounts(60)
    c.add(T0, 30, 3000)
    # 30 events 10 ms into the first second: denominator floors at 1 s
    assert c.rate(T0, 10, elapsed=0.01) == (30.0, 3000.0)


def test_partial_current_second_scaled_by_elapsed() -> None:
    c = SecondCounts(60)
    for s in range(T0, T0 + 20):
        c.add(s, 100, 0)
    c.add(T0 + 20, 50, 0)  # half a second of data at 100 ev/s
    # window T0+11..T0+20: 9 complete seconds + 0.5 of the current
    ev, _ = c.rate(T0 + 20, 10, elapsed=0.5)
    assert ev == pytest.approx(950 / 9.5) and ev == pytest.approx(100.0)
    # default elapsed=1.0 never over-estimates
    assert c.rate(T0 + 20, 10)[0] == pytest.approx(950 / 10)
    # out-of-range elapsed is clamped
    assert c.rate(T0 + 20, 10, elapsed=7.0) == c.rate(T0 + 20, 10, elapsed=1.0)


def test_jump_100_to_2000_detected_within_one_to_two_seconds() -> None:
    burst_horizon = Settings().burst_horizon_seconds  # 10
    c = SecondCounts(60)
    for s in range(T0, T0 + 60):
        c.add(s, 100, 0)
        assert c.rate(s, burst_horizon)[0] <= 150
    jump = T0 + 60
    # half a second into the first jump second (1000 events so far)
    c.add(jump, 1000, 0)
    ev_half, _ = c.rate(jump, burst_horizon, elapsed=0.5)
    assert ev_half == pytest.approx((9 * 100 + 1000) / 9.5)
    assert ev_half > 150
    # the same with the conservative default after one full second of data
    c.add(jump, 1000, 0)
    assert c.rate(jump, burst_horizon)[0] == pytest.approx((9 * 100 + 2000) / 10) == 290.0
    # after two seconds of data
    c.add(jump + 1, 2000, 0)
    assert c.rate(jump + 1, burst_horizon)[0] == pytest.approx((8 * 100 + 4000) / 10) == 480.0


def test_resumed_project_treated_as_new_after_silent_ring() -> None:
    c = SecondCounts(60)
    c.add(T0, 100, 0)
    later = T0 + 500  # > 60 s of silence: a new activity run
    c.add(later, 2000, 0)
    assert c.run_start == later
    assert c.rate(later, 10)[0] == 2000.0
    # shorter gap: the run continues, averaged over the horizon
    c2 = SecondCounts(60)
    c2.add(T0, 100, 0)
    c2.add(T0 + 30, 2000, 0)
    assert c2.run_start == T0
    assert c2.rate(T0 + 30, 10)[0] == 200.0


def test_old_data_leaves_the_window() -> None:
    c = SecondCounts(60)
    c.add(T0, 1000, 100)
    assert c.rate(T0 + 9, 10) == (100.0, 10.0)
    assert c.rate(T0 + 10, 10) == (0.0, 0.0)
    assert c.rate(T0 + 59, 60) == (1000 / 60, 100 / 60)
    assert c.rate(T0 + 60, 60) == (0.0, 0.0)


def test_future_seconds_excluded_and_late_seconds_dropped() -> None:
    c = SecondCounts(60)
    c.add(T0 + 100, 10, 1)
    assert c.rate(T0 + 99, 10) == (0.0, 0.0)  # data after now is not counted
    assert c.add(T0 + 40, 5, 1) is False  # <= last - size: its slot is gone
    assert c.add(T0 + 41, 5, 1) is True  # still inside the ring
    assert c.run_start == T0 + 41  # late data extends the run backwards
    assert c.counts(T0 + 41) == (5, 1)


def test_zero_counts_do_not_start_a_run() -> None:
    c = SecondCounts(60)
    assert c.add(T0, 0, 0)
    assert c.run_start is None and c.last_second is None


def test_full_window_dilutes_new_project_for_sustained_estimate() -> None:
    c = SecondCounts(60)
    for s in range(T0, T0 + 10):
        c.add(s, 120, 0)
    assert c.rate(T0 + 9, 60) == (120.0, 0.0)  # shortened: averaged over the 10 s run
    assert c.rate(T0 + 9, 60, full_window=True) == (20.0, 0.0)  # 1200 over 60 s
    for s in range(T0 + 10, T0 + 60):
        c.add(s, 120, 0)
    assert c.rate(T0 + 59, 60, full_window=True) == (120.0, 0.0)


def test_horizon_validated() -> None:
    c = SecondCounts(60)
    with pytest.raises(ValueError):
        c.rate(T0, 0)
    with pytest.raises(ValueError):
        c.rate(T0, 61)
    with pytest.raises(ValueError):
        SecondCounts(0)


def test_series_oldest_first_with_zeros() -> None:
    c = SecondCounts(60)
    c.add(T0, 1, 10)
    c.add(T0 + 2, 3, 30)
    assert c.series(T0 + 2, 4) == [
        (T0 - 1, 0, 0),
        (T0, 1, 10),
        (T0 + 1, 0, 0),
        (T0 + 2, 3, 30),
    ]
    assert len(c.series(T0 + 2, 1000)) == 60
    assert c.series(T0 + 2, 0) == []


def test_to_dict_round_trip_compact_json() -> None:
    c = SecondCounts(60)
    for s, e in ((T0 + 5, 7), (T0 + 7, 9), (T0 + 8, 1)):
        c.add(s, e, e * 100)
    d = c.to_dict()
    assert d == {
        "v": 1,
        "h": 60,
        "t": T0 + 8,
        "r": T0 + 5,
        "e": [7, 0, 9, 1],
        "b": [700, 0, 900, 100],
    }
    back = SecondCounts.from_dict(json.loads(json.dumps(d)))
    assert back.series(T0 + 8, 60) == c.series(T0 + 8, 60)
    assert back.run_start == T0 + 5 and back.last_second == T0 + 8
    assert back.rate(T0 + 8, 10) == c.rate(T0 + 8, 10) == (17 / 4, 1700 / 4)
    assert SecondCounts.from_dict(SecondCounts(30).to_dict()).size == 30
    assert SecondCounts(30).to_dict() == {"v": 1, "h": 30}


def test_to_dict_after_wraparound() -> None:
    c = SecondCounts(5)
    for s in range(T0, T0 + 12):
        c.add(s, s - T0, 1)
    d = c.to_dict()
    assert d["e"] == [7, 8, 9, 10, 11]
    back = SecondCounts.from_dict(d)
    assert back.series(T0 + 11, 5) == c.series(T0 + 11, 5)
    assert back.rate(T0 + 11, 5) == c.rate(T0 + 11, 5) == (9.0, 1.0)


def test_merge_counts_sums_rings() -> None:
    a = SecondCounts(60)
    b = SecondCounts(60)
    for s in range(T0, T0 + 20):
        a.add(s, 10, 100)
    for s in range(T0 + 10, T0 + 20):
        b.add(s, 5, 50)
    m = merge_counts(a, b)
    assert m.counts(T0 + 5) == (10, 100)
    assert m.counts(T0 + 15) == (15, 150)
    assert m.run_start == T0
    assert m.rate(T0 + 19, 10) == (15.0, 150.0)
    # inputs untouched
    assert a.counts(T0 + 15) == (10, 100) and b.counts(T0 + 5) == (0, 0)


def test_tally_aggregates_per_project_second() -> None:
    records = [("p1", T0, 10), ("p1", T0, 20), ("p2", T0, 5), ("p1", T0 + 1, 1)]
    assert tally(records) == {
        ("p1", T0): [2, 30],
        ("p2", T0): [1, 5],
        ("p1", T0 + 1): [1, 1],
    }


# ---------------------------------------------------------------- quota

Q = Quota(eps=100.0, bps=1_000_000.0, burst=0.5)
COOLDOWN = 30.0
EXIT = 0.8


def run(
    state: ShedState,
    now: float,
    eps: float,
    bps: float = 0.0,
    sustained: float | None = None,
) -> ShedState:
    return step(
        state,
        now=now,
        burst_eps=eps,
        burst_bps=bps,
        sustained_eps=eps if sustained is None else sustained,
        quota=Q,
        cooldown=COOLDOWN,
        exit_ratio=EXIT,
    )


def test_quota_from_settings_and_effective_quota() -> None:
    q = Quota.from_settings(Settings())
    assert q == Quota(eps=1000.0, bps=2_000_000.0, burst=0.5)
    assert q.enter_eps == 1500.0 and q.enter_bps == 3_000_000.0
    assert effective_quota(q, 0.5) == Quota(eps=500.0, bps=1_000_000.0, burst=0.5)
    assert effective_quota(q, 1.0) is q
    assert effective_quota(q, 3.0) is q  # health never loosens
    with pytest.raises(ValueError):
        effective_quota(q, 0.0)
    with pytest.raises(ValueError):
        Quota(eps=-1.0, bps=1.0)


# ---------------------------------------------------------------- state machine


def test_ok_stays_ok_and_same_object_under_limit() -> None:
    s = ShedState("p1")
    assert run(s, 1.0, 149.0, sustained=100.0) is s  # burst tolerance: 149 <= 150
    assert run(s, 1.0, 150.0, sustained=100.0) is s  # not strictly above


def test_ok_to_shed_on_event_burst_with_reason() -> None:
    s = ShedState("p1", mode="drop")
    new = run(s, 10.0, 2000.0, sustained=300.0)
    assert new is not s and s.state == "ok"  # original untouched
    assert new.state == "shed" and new.mode == "drop"
    assert new.reason == "rate 2000.0 ev/s > limit 150.0 ev/s"
    assert (new.since, new.episode, new.below_since) == (10.0, 1, None)
    assert (new.observed_eps, new.limit_eps, new.limit_bps) == (
        2000.0,
        100.0,
        1_000_000.0,
    )
    assert new.enforcing


def test_ok_to_shed_on_byte_burst() -> None:
    new = run(ShedState("p1"), 5.0, 10.0, bps=2_000_000.0)
    assert new.state == "shed"
    assert new.reason == "rate 2000000.0 B/s > limit 1500000.0 B/s"
    assert new.observed_bps == 2_000_000.0


def test_ok_to_shed_on_sustained_over_quota() -> None:
    new = run(ShedState("p1"), 5.0, 120.0, sustained=120.0)
    assert new.state == "shed"
    assert new.reason == "sustained rate 120.0 ev/s > quota 100.0 ev/s"


def test_cooldown_timing_exact() -> None:
    s = run(ShedState("p1"), 0.0, 2000.0)
    s = run(s, 1.0, 50.0)
    assert s.state == "shed" and s.below_since == 1.0
    same = run(s, 2.0, 50.0)
    assert same is s  # still below, nothing changed
    s = run(s, 30.9, 50.0)
    assert s.state == "shed"
    s = run(s, 31.0, 50.0)  # exactly cooldown after below_since
    assert s.state == "ok" and s.since == 31.0 and s.below_since is None
    assert s.reason == "rate 50.0 ev/s < 80.0 ev/s for 30.0 s"
    assert s.episode == 1


def test_any_second_above_exit_resets_cooldown() -> None:
    s = run(ShedState("p1"), 0.0, 2000.0)
    for t in range(1, 20):
        s = run(s, float(t), 50.0)
    assert s.below_since == 1.0
    s = run(s, 20.0, 90.0)  # above exit (80) though under the quota
    assert s.state == "shed" and s.below_since is None
    for t in range(21, 51):
        s = run(s, float(t), 50.0)
    assert s.state == "shed" and s.below_since == 21.0
    s = run(s, 51.0, 50.0)
    assert s.state == "ok" and s.since == 51.0


def test_no_flapping_when_rate_oscillates_around_entry_threshold() -> None:
    s = ShedState("p1")
    states = []
    for t in range(200):
        eps = 160.0 if t % 2 else 140.0  # around the 150 entry threshold
        s = run(s, float(t), eps, sustained=100.0)
        states.append(s.state)
    # shed once at the first 160 and stays shed: never below the exit threshold
    assert states[0] == "ok" and all(x == "shed" for x in states[1:])
    assert s.episode == 1


def test_no_flapping_when_rate_oscillates_around_exit_threshold() -> None:
    s = run(ShedState("p1"), 0.0, 2000.0)
    for t in range(1, 300):
        eps = 85.0 if t % 2 else 75.0  # around the 80 exit threshold
        s = run(s, float(t), eps)
        assert s.state == "shed"
    assert s.episode == 1
    # once it stays below for the cooldown it exits exactly once
    transitions = 0
    prev = s.state
    for t in range(300, 400):
        s = run(s, float(t), 75.0)
        transitions += s.state != prev
        prev = s.state
    assert transitions == 1 and s.state == "ok" and s.since == 330.0


def test_exit_requires_sustained_not_over_quota() -> None:
    s = run(ShedState("p1"), 0.0, 2000.0)
    for t in range(1, 100):
        s = run(s, float(t), 50.0, sustained=130.0)  # long average still over quota
    assert s.state == "shed" and s.below_since is None
    # no re-entry right after exit: exit implies sustained <= quota
    for t in range(100, 131):
        s = run(s, float(t), 50.0, sustained=100.0)
    assert s.state == "ok" and s.since == 130.0
    assert run(s, 131.0, 50.0, sustained=100.0) is s


def test_reenter_starts_new_episode() -> None:
    s = run(ShedState("p1"), 0.0, 2000.0)
    for t in range(1, 32):
        s = run(s, float(t), 10.0)
    assert s.state == "ok"
    s = run(s, 40.0, 500.0)
    assert s.state == "shed" and s.episode == 2 and s.since == 40.0


def test_manual_shed_wins_until_cleared() -> None:
    s = ShedState("p1")
    s = set_manual(s, "shed", 5.0)
    assert (s.state, s.manual, s.reason, s.since, s.episode) == (
        "shed",
        "shed",
        "manual shed",
        5.0,
        1,
    )
    for t in range(6, 100):
        s = run(s, float(t), 0.0)
        assert s.state == "shed"
    assert s.below_since == 6.0  # tracked under the override
    assert set_manual(s, "shed", 100.0) is s
    s = set_manual(s, None, 100.0)
    assert s.manual is None and s.state == "shed"
    s = run(s, 101.0, 0.0)  # quiet for > cooldown already: unshed at once
    assert s.state == "ok" and s.since == 101.0


def test_manual_unshed_wins_until_cleared() -> None:
    s = run(ShedState("p1"), 0.0, 2000.0)
    s = set_manual(s, "unshed", 1.0)
    assert (s.state, s.reason, s.since) == ("ok", "manual unshed", 1.0)
    for t in range(2, 50):
        s = run(s, float(t), 5000.0)
        assert s.state == "ok"
    s = set_manual(s, None, 50.0)
    s = run(s, 51.0, 5000.0)
    assert s.state == "shed" and s.episode == 2


def test_step_enforces_manual_from_persisted_state() -> None:
    # e.g. an override written by an admin, state not yet applied
    s = ShedState("p1", manual="shed")
    s2 = run(s, 3.0, 0.0)
    assert s2.state == "shed" and s2.reason == "manual shed" and s2.below_since == 3.0
    u = ShedState("p1", state="shed", manual="unshed")
    assert run(u, 3.0, 9999.0).state == "ok"


def test_shadow_and_drop_modes_carried_through() -> None:
    for mode in ("shadow", "drop", "divert"):
        s = run(ShedState("p1", mode=mode), 0.0, 2000.0)
        assert s.state == "shed" and s.mode == mode
        assert s.enforcing is (mode != "shadow")
        for t in range(1, 32):
            s = run(s, float(t), 0.0)
        assert s.state == "ok" and s.mode == mode
    s = ShedState("p1")
    assert with_mode(s, "divert") is s
    assert with_mode(s, "shadow").mode == "shadow"


def test_shed_state_validation_and_json_round_trip() -> None:
    with pytest.raises(ValueError):
        ShedState("p1", state="maybe")
    with pytest.raises(ValueError):
        ShedState("p1", mode="queue")
    with pytest.raises(ValueError):
        ShedState("p1", manual="yes")
    with pytest.raises(ValueError):
        set_manual(ShedState("p1"), "yes", 0.0)
    s = run(run(ShedState("p1", mode="shadow"), 0.0, 2000.0), 1.0, 10.0)
    d = json.loads(json.dumps(s.to_dict()))
    assert ShedState.from_dict(d) == s
    assert ShedState.from_dict({**d, "added_later": 1}) == s


def test_deterministic() -> None:
    def trace() -> list[dict[str, object]]:
        s = ShedState("p1")
        out = []
        for t in range(100):
            s = run(s, t * 0.5, 2000.0 if 10 <= t < 20 else 40.0)
            out.append(s.to_dict())
        return out

    assert trace() == trace()


# ---------------------------------------------------------------- admission


def test_admit_fraction() -> None:
    assert admit_fraction(2000.0, 100.0) == 0.05
    assert admit_fraction(100.0, 100.0) == 1.0
    assert admit_fraction(50.0, 100.0) == 1.0
    assert admit_fraction(0.0, 100.0) == 1.0
    assert admit_fraction(float("nan"), 100.0) == 1.0
    assert admit_fraction(1e12, 1.0) == MIN_ADMIT_FRACTION
    assert admit_fraction(100.0, 0.0) == MIN_ADMIT_FRACTION


def test_mix64_pinned_outputs() -> None:
    # SplitMix64 reference outputs; changing them would change replayed decisions
    assert mix64(0) == 0xE220A8397B1DCDAF
    assert mix64(1) == 0x910A2DEC89025CC1
    assert mix64(-1) == mix64((1 << 64) - 1)


def test_admit_event_pinned_decisions() -> None:
    got = [admit_event(i, 0.5) for i in range(16)]
    exp = [
        False,
        False,
        False,
        True,
        True,
        True,
        False,
        True,
        False,
        False,
        True,
        True,
        False,
        False,
        True,
        False,
    ]
    assert got == exp


@pytest.mark.parametrize("fraction", [0.02, 0.05, 0.1, 0.3, 0.5, 0.9])
def test_admit_event_share_and_repeatability(fraction: float) -> None:
    n = 100_000
    first = [admit_event(p, fraction) for p in range(n)]
    share = sum(first) / n
    assert abs(share - fraction) <= 0.03 * fraction + 1e-9
    assert [admit_event(p, fraction) for p in range(n)] == first
    assert admit_many(range(n), fraction) == first
    # offsets far from 0 behave the same
    far = sum(admit_event(p, fraction) for p in range(10**12, 10**12 + n)) / n
    assert abs(far - fraction) <= 0.03 * fraction + 1e-9


def test_admit_event_small_fraction_within_sampling_error() -> None:
    # at 1 % one standard deviation over 100k positions is already ~3 % relative,
    # so the bound here is 4 sigma instead
    n, f = 100_000, 0.01
    share = sum(admit_event(p, f) for p in range(n)) / n
    assert abs(share - f) <= 4 * math.sqrt(f * (1 - f) / n)


def test_admit_event_edges_and_monotonic() -> None:
    assert all(admit_event(p, 1.0) for p in range(1000))
    assert not any(admit_event(p, 0.0) for p in range(1000))
    assert admit_many(range(5), 1.0) == [True] * 5
    assert admit_many(range(5), -1.0) == [False] * 5
    assert admit_threshold(0.5) == 1 << 63
    # an event admitted at a fraction is admitted at any larger fraction
    lo = admit_many(range(10_000), 0.2)
    hi = admit_many(range(10_000), 0.4)
    assert all(h for lo_, h in zip(lo, hi, strict=True) if lo_)


def test_retry_after_seconds() -> None:
    ok = ShedState("p1")
    assert retry_after_seconds(ok, 0.0, 30.0) == 1
    shed = run(ok, 0.0, 2000.0)
    assert retry_after_seconds(shed, 0.0, 30.0) == 30
    below = run(shed, 10.0, 10.0)
    assert retry_after_seconds(below, 22.5, 30.0) == 18  # ceil(30 - 12.5)
    assert retry_after_seconds(below, 45.0, 30.0) == 1  # overdue, never < 1
    manual = set_manual(ok, "shed", 0.0)
    assert retry_after_seconds(manual, 100.0, 30.0) == 30
    assert retry_after_seconds(shed, 0.0, 0.2) == 1


# ---------------------------------------------------------------- token bucket


def test_token_bucket_refill_math() -> None:
    b = TokenBucket(rate=10.0, capacity=5.0)
    assert b.take(100.0, 3) == 3  # starts full
    assert b.take(100.0, 5) == 2  # partial admission
    assert b.take(100.0) == 0
    assert b.wait_time(100.0) == pytest.approx(0.1)
    assert b.wait_time(100.0, 4) == pytest.approx(0.4)
    assert b.take(100.25, 5) == 2  # 2.5 tokens refilled
    assert b.tokens == pytest.approx(0.5)
    assert b.take(100.3, 1) == 1  # 0.5 + 0.5 = exactly 1 despite float error
    assert b.take(1000.0, 100) == 5  # capped at capacity
    assert b.wait_time(1000.0, 100) == pytest.approx(0.5)  # clamped to capacity


def test_token_bucket_time_going_back_and_zero_rate() -> None:
    b = TokenBucket(rate=1.0, capacity=2.0, tokens=0.0)
    b.take(10.0, 0)
    assert b.take(9.0) == 0  # earlier time: no refill
    assert b.take(11.0) == 1
    z = TokenBucket(rate=0.0, capacity=1.0, tokens=0.0)
    assert z.wait_time(0.0) == math.inf
    assert z.take(1e9) == 0
    with pytest.raises(ValueError):
        TokenBucket(rate=-1.0, capacity=1.0)
    with pytest.raises(ValueError):
        TokenBucket(rate=1.0, capacity=0.0)


def test_token_bucket_long_run_rate() -> None:
    b = TokenBucket(rate=50.0, capacity=10.0)
    # 500 events/s offered for 10 s
    admitted = sum(b.take(t * 0.01, 5) for t in range(1000))
    # initial 10 + 50/s over the 9.99 s between first and last call (499.5 -> 499 whole tokens)
    assert admitted == 10 + 499


def test_token_bucket_set_rate() -> None:
    b = TokenBucket(rate=10.0, capacity=100.0, tokens=0.0)
    b.take(0.0, 0)
    b.set_rate(1.0, 100.0)  # 10 tokens earned at the old rate
    assert b.tokens == pytest.approx(10.0)
    assert b.take(1.5, 100) == 60
    b.set_rate(1.5, 1.0, capacity=5.0)
    assert b.capacity == 5.0 and b.tokens == 0.0


# ---------------------------------------------------------------- pacer


def test_pacer_allowance_scaling() -> None:
    p = Pacer(20_000.0)
    assert p.allowance(0.0, 0.0, 120.0) == 20_000.0
    assert p.allowance(0.0, -5.0, 120.0) == 20_000.0
    assert p.allowance(0.0, 60.0, 120.0) == pytest.approx(20_000 * (1 - 0.95 * 0.5)) == 10_500.0
    assert p.allowance(0.0, 120.0, 120.0) == pytest.approx(1000.0)
    assert p.allowance(0.0, 1e9, 120.0) == pytest.approx(1000.0)  # floor, never 0
    assert p.allowance(0.0, float("nan"), 120.0) == pytest.approx(1000.0)
    assert p.allowance(0.0, 500.0, 0.0) == 20_000.0  # threshold disabled
    ages = [p.allowance(0.0, a, 120.0) for a in range(0, 200, 10)]
    assert all(x >= y for x, y in itertools.pairwise(ages))
    assert min(ages) > 0
    with pytest.raises(ValueError):
        Pacer(0.0)
    with pytest.raises(ValueError):
        Pacer(10.0, floor_fraction=0.0)


def test_pacer_waits_for_the_last_delivery_at_the_current_allowance() -> None:
    p = Pacer(1000.0)
    assert p.wait_seconds(10.0, 0.0, 120.0) == 0.0  # idle: go at once
    p.started(500, 10.0)
    assert p.wait_seconds(10.0, 0.0, 120.0) == pytest.approx(0.5)
    assert p.wait_seconds(10.2, 0.0, 120.0) == pytest.approx(0.3)
    # idle time earns no credit: long after the last delivery, one goes at once and the next waits
    assert p.wait_seconds(50.0, 0.0, 120.0) == 0.0
    p.started(100, 50.0)
    assert p.wait_seconds(50.0, 0.0, 120.0) == pytest.approx(0.1)
    # at the threshold the drain slows to the floor (50 ev/s)
    p.reset()
    assert p.wait_seconds(0.0, 120.0, 120.0) == 0.0
    p.started(100, 0.0)
    assert p.wait_seconds(0.0, 120.0, 120.0) == pytest.approx(2.0)


def test_pacer_wait_follows_the_backlog_while_the_drain_waits() -> None:
    """A chunk delivered under pressure must not hold the drain back at the floor rate once the
    real-time backlog is gone (nor go at full rate when a backlog builds during the wait)."""
    p = Pacer(1000.0, memory_seconds=0.0)
    p.started(5000, 0.0)
    assert p.wait_seconds(0.1, 120.0, 120.0) == pytest.approx(100.0 - 0.1)  # floor: 50 ev/s
    assert p.wait_seconds(1.0, 0.0, 120.0) == pytest.approx(4.0)  # backlog gone: 1000 ev/s from the start
    assert p.wait_seconds(5.0, 0.0, 120.0) == 0.0
    p.started(1000, 5.0)
    assert p.wait_seconds(5.5, 0.0, 120.0) == pytest.approx(0.5)
    assert p.wait_seconds(5.5, 120.0, 120.0) == pytest.approx(19.5)  # backlog built: yields


def test_pacer_is_slow_to_speed_up_and_quick_to_yield() -> None:
    """A backlog age that dips to 0 between window writes must not let the drain go at full rate."""
    p = Pacer(1000.0, memory_seconds=5.0)
    p.started(1000, 0.0)
    assert p.wait_seconds(0.5, 120.0, 120.0) == pytest.approx(19.5)  # at the floor (50 ev/s)
    assert p.wait_seconds(3.0, 0.0, 120.0) == pytest.approx(17.0)  # a dip: still the floor
    assert p.wait_seconds(5.6, 0.0, 120.0) == 0.0  # 5 s without a backlog: full rate again
    assert p.recent_age(5.6, 0.0) == 0.0
    assert p.recent_age(6.0, 60.0) == 60.0  # a new backlog counts at once
    assert math.isnan(p.recent_age(6.0, float("nan")))
    assert p.recent_age(6.1, 0.0) == 0.0  # a read (the views') is not remembered ...
    p.wait_seconds(6.2, 60.0, 120.0)
    assert p.recent_age(6.3, 0.0) == 60.0  # ... what the drain waited on is


def test_pacer_counts_the_time_spent_reading_a_delivery_toward_its_share() -> None:
    """Reading and cutting 2,000 events took the drain 2 s at 1,000 ev/s allowed: the deliveries
    go at once, as long as each share starts after the previous one's (no idle credit)."""
    p = Pacer(1000.0)
    assert p.wait_seconds(2.0, 0.0, 120.0) == 0.0
    p.started(1000, 2.0, working_since=0.0)  # the first share counts from the reading's start ...
    assert p.wait_seconds(2.0, 0.0, 120.0) == 0.0  # ... so it ended at 1.0: the next goes now
    p.started(1000, 2.0, working_since=0.0)  # and counts from 1.0, when the previous share ended
    assert p.wait_seconds(2.0, 0.0, 120.0) == 0.0
    p.started(1000, 2.0, working_since=0.0)  # from 2.0: a third delivery of that reading waits
    assert p.wait_seconds(2.0, 0.0, 120.0) == pytest.approx(1.0)
    # the reading began long after the last share ended: the time before it earns nothing
    assert p.wait_seconds(50.0, 0.0, 120.0) == 0.0
    p.started(1000, 50.5, working_since=50.0)
    assert p.wait_seconds(50.5, 0.0, 120.0) == pytest.approx(0.5)
    # never from after now (a clock read before the reading's start), nor without a judged share
    p.started(1000, 51.0, working_since=60.0)
    assert p.wait_seconds(51.0, 0.0, 120.0) == pytest.approx(1.0)
    p.started(1000, 52.0, working_since=0.0)  # not asked since the last delivery: from now
    assert p.wait_seconds(52.0, 0.0, 120.0) == pytest.approx(1.0)


def test_pacer_sustained_rate_matches_allowance_however_long_the_reading() -> None:
    """Whatever the reading costs, a drain paced with its working time never beats the allowance."""
    for read_seconds in (0.0, 0.03, 0.05, 0.2):
        p = Pacer(2000.0)
        now = 0.0  # the first reading begins
        for _ in range(100):
            reading = now
            now += read_seconds  # reading and cutting 100 events
            now += p.wait_seconds(now, 0.0, 120.0)
            p.started(100, now, working_since=reading)
        # the 100th delivery starts no sooner than 99 shares after the work began ...
        assert now >= 99 * 100 / 2000.0 - 1e-9, read_seconds
        # ... and no later than the slower of reading and share allows (the reading is credited)
        assert now <= read_seconds + 99 * max(read_seconds, 100 / 2000.0) + 1e-9, read_seconds


def test_pacer_sustained_rate_matches_allowance() -> None:
    p = Pacer(2000.0)
    now = 0.0
    for _ in range(100):
        now += p.wait_seconds(now, 60.0, 120.0)  # sleep, then deliver 100
        p.started(100, now)
    # 100 batches, the last one starting after 99 batch intervals
    assert now == pytest.approx(99 * 100 / p.allowance(0.0, 60.0, 120.0))


# ---------------------------------------------------------------- health


def test_health_factor_rule() -> None:
    kw = {"backlog_threshold_s": 120.0, "latency_threshold_ms": 500.0}
    assert health_factor(0.0, 0.0, **kw) == 1.0
    assert health_factor(120.0, 500.0, **kw) == 1.0
    assert health_factor(240.0, 100.0, **kw) == 0.5
    assert health_factor(10.0, 1000.0, **kw) == 0.5
    assert health_factor(180.0, 1000.0, **kw) == 0.5  # worse of 2/3 and 1/2
    assert health_factor(1e6, 0.0, **kw) == 0.25  # floor
    assert health_factor(1e6, 0.0, floor=0.1, **kw) == 0.1
    # no data: no tightening
    assert health_factor(float("nan"), float("nan"), **kw) == 1.0
    assert health_factor(1e6, 1e6, backlog_threshold_s=0.0, latency_threshold_ms=0.0) == 1.0


def test_tighten_heaviest() -> None:
    rates = {"a": 5000.0, "b": 3000.0, "c": 100.0, "d": 0.0}
    quotas = {"a": 1000.0, "b": 1000.0, "c": 1000.0, "d": 1000.0}
    got = tighten_heaviest(rates, quotas, 0.5, 2)
    assert got == {"a": 500.0, "b": 500.0, "c": 1000.0, "d": 1000.0}
    assert quotas["a"] == 1000.0  # input untouched
    # zero-rate projects never tightened even if top_n is larger
    assert tighten_heaviest(rates, quotas, 0.5, 10)["d"] == 1000.0
    assert tighten_heaviest(rates, quotas, 1.0, 2) == quotas
    assert tighten_heaviest(rates, quotas, 0.5, 0) == quotas
    # ties broken by project id
    tie = tighten_heaviest({"y": 10.0, "x": 10.0}, {"x": 4.0, "y": 4.0}, 0.5, 1)
    assert tie == {"x": 2.0, "y": 4.0}
    # projects without a quota: ignored, or given the default
    assert tighten_heaviest({"z": 9e9}, {"a": 1.0}, 0.5, 1) == {"a": 1.0}
    assert tighten_heaviest({"z": 9e9}, {"a": 1.0}, 0.5, 1, default=100.0) == {
        "a": 1.0,
        "z": 50.0,
    }
    with pytest.raises(ValueError):
        tighten_heaviest(rates, quotas, 0.0, 1)


def test_end_to_end_meter_to_state() -> None:
    """Counts -> rates -> effective quota -> state -> admitted share."""
    settings = Settings()
    quota = Quota(eps=100.0, bps=1e9, burst=settings.burst_tolerance)
    c = SecondCounts(settings.sustained_horizon_seconds)
    s = ShedState("p1", mode=settings.shed_mode)
    shed_at = None
    for sec in range(T0, T0 + 120):
        c.add(sec, 100 if sec < T0 + 60 else 2000, 0)
        burst = c.rate(sec, settings.burst_horizon_seconds)
        sustained = c.rate(sec, settings.sustained_horizon_seconds, full_window=True)
        q = effective_quota(
            quota,
            health_factor(0.0, 0.0, backlog_threshold_s=120.0, latency_threshold_ms=500.0),
        )
        s = step(
            s,
            now=float(sec),
            burst_eps=burst[0],
            burst_bps=burst[1],
            sustained_eps=sustained[0],
            quota=q,
            cooldown=settings.shed_cooldown_seconds,
            exit_ratio=settings.shed_exit_ratio,
        )
        if s.state == "shed" and shed_at is None:
            shed_at = sec
    assert shed_at == T0 + 60  # first second of the burst
    assert s.state == "shed" and s.mode == "divert"
    frac = admit_fraction(c.rate(T0 + 119, 10)[0], quota.eps)
    assert frac == pytest.approx(0.05)


def test_new_project_within_tolerance_shed_only_once_sustained() -> None:
    """120 ev/s against a 100 ev/s quota: a burst within tolerance, until it lasts."""
    c = SecondCounts(60)
    s = ShedState("p1")
    shed_at = None
    for sec in range(T0, T0 + 120):
        c.add(sec, 120, 0)
        burst_eps, burst_bps = c.rate(sec, 10)
        sustained_eps, _ = c.rate(sec, 60, full_window=True)
        s = run(s, float(sec), burst_eps, burst_bps, sustained=sustained_eps)
        if s.state == "shed" and shed_at is None:
            shed_at = sec
    # 51 s of data: 6120 events / 60 s = 102 ev/s > 100
    assert shed_at == T0 + 50
    assert s.reason == "sustained rate 102.0 ev/s > quota 100.0 ev/s"
