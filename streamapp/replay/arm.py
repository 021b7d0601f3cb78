"""One arm of the replay, start to stop: its stack (broker, S3 server, worker), the calibration
(baseline only: it times the worker on a backlog of the spike's records and sizes the spike from
it), the projects created through the admin API, the traffic (in its own process), then reading S3
until every accepted event is there, and the analysis. The next arm's stack can be prepared
(started, its projects created) while this one is analysed (``run_arm(on_settled=...)``).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import streamapp.replay.report as report
from streamapp.replay.analysis import RequestTable, analyse_arm, backlog_rate, expand_ids
from streamapp.replay.measure import ObjectNotices, S3Watcher, ShedWatcher, settle, sink_events_read
from streamapp.replay.scenario import Scenario
from streamapp.replay.stack import ArmStack
from streamapp.replay.traffic import run_traffic

CALIBRATION_PROJECT = "calib"
#: Backlogs the calibration times, one after the other; the best counts (``calibrate``).
CALIBRATION_ROUNDS = 2
#: The workers' group session timeout: Tansu answers a first join after half of it (the first
#: project of a fresh worker is created 5.9 s after its API answers at the default 10 s, 2.9 s at
#: 4 s). The worker heartbeats every second from its consumer thread, and its sink yields to the
#: loop every 5,000 events (~0.2 s with add-ons), so 4 s is still far from a missed session.
SESSION_TIMEOUT_SECONDS = 4.0


@dataclass
class PreparedArm:
    """An arm's stack, started, with its projects created (``prepare_arm``)."""

    stack: ArmStack
    keys: dict[str, str]
    phases: dict[str, float]  # wall seconds of "start" and "create_projects"


def arm_stack(arm: str, mode: str, scenario: Scenario, out: Path, external: bool) -> ArmStack:
    """The arm's stack, not started: the worker's settings follow the scenario and the arm's shed mode."""
    worker_settings: dict[str, object] = {
        "window_seconds": scenario.window_seconds,
        "allowed_lateness_seconds": scenario.allowed_lateness_seconds,
        "idle_flush_seconds": scenario.idle_flush_seconds,
        "shed_mode": mode,
        "health_backlog_seconds": scenario.health_backlog_seconds,
        "burst_horizon_seconds": scenario.burst_horizon_seconds,
        "session_timeout_seconds": SESSION_TIMEOUT_SECONDS,
        "drain_processes": scenario.drain_processes,
    }
    if scenario.derived:
        worker_settings["overflow_max_eps"] = scenario.derived["overflow_max_eps"]
        worker_settings["overflow_floor_fraction"] = scenario.derived["overflow_floor_fraction"]
    return ArmStack(arm, out / "logs" / arm, worker_settings, external=external)


def prepare_arm(stack: ArmStack, scenario: Scenario, on_project: Callable[[int], None] | None = None) -> PreparedArm:
    """Start ``stack`` and create the scenario's projects (sized: their quota is known); the stack
    is stopped again if either fails. Runs in a thread while the previous arm is analysed."""
    clock = time.monotonic()
    stack.start()
    phases = {"start": round(time.monotonic() - clock, 2)}
    try:
        keys = create_projects(stack, scenario, on_project)
    except BaseException:
        stack.stop()
        raise
    phases["create_projects"] = round(time.monotonic() - clock - phases["start"], 2)
    return PreparedArm(stack, keys, phases)


def create_projects(
    stack: ArmStack, scenario: Scenario, on_project: Callable[[int], None] | None = None
) -> dict[str, str]:
    """The scenario's projects, created through the worker's admin API: their write keys."""
    quota = scenario.derived["quota_eps"]
    keys: dict[str, str] = {}
    with ThreadPoolExecutor(8) as pool:  # each creation waits for the control topic round trip
        futures = {p: pool.submit(stack.create_project, p, quota) for p in scenario.project_ids()}
        for project, future in futures.items():
            keys[project] = future.result()
            if on_project is not None:
                on_project(len(keys))
    return keys


def run_arm(
    arm: str,
    mode: str,
    scenario: Scenario,
    out: Path,
    external: bool,
    console: Any,
    prepared: Future[PreparedArm] | None = None,
    on_settled: Callable[[Scenario], None] = lambda sized: None,
) -> tuple[dict[str, Any], dict[str, Any], Scenario]:
    """One arm, start to stop. ``prepared``: its stack, started while the previous arm was analysed
    (its scenario sized already); ``on_settled(scenario)``: called once S3 holds every accepted event
    of this arm, before its analysis (the next arm is prepared meanwhile)."""
    if scenario.capacity_eps is not None and not scenario.derived:
        scenario = scenario.sized(scenario.capacity_eps)  # given: this arm's worker gets the drain ceiling too
    phases: dict[str, float] = {}  # wall seconds of each phase of this arm (summary: phase_seconds)
    clock = time.monotonic()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.monotonic()
        phases[phase] = round(now - clock, 2)
        clock = now

    # Once the arm's objects are read from S3 its stack is stopped in the background, during the analysis.
    stopping = threading.Thread(target=lambda: stack.stop(), name=f"stop-{arm}")

    with report.progress(console) as bar:
        if prepared is not None:
            task = bar.add_task(f"{arm}: its stack and projects (started during the previous analysis)", total=None)
            ready = prepared.result()
            bar.update(task, total=1, completed=1)
            stack, keys = ready.stack, ready.keys
            lap("waited_for_stack")
            phases.update(ready.phases)  # overlapped with the previous arm's analysis
        else:
            stack = arm_stack(arm, mode, scenario, out, external)
            task = bar.add_task(f"{arm}: starting broker, S3, worker", total=None)
            stack.start()
            bar.update(task, total=1, completed=1)
            lap("start")
        try:
            if prepared is None:
                if scenario.capacity_eps is None:
                    task = bar.add_task(
                        f"{arm}: calibrating capacity (timing the worker on a backlog)",
                        total=CALIBRATION_ROUNDS * scenario.calibration_seconds,
                    )
                    capacity, rounds, producer_eps = calibrate(
                        stack, scenario, out, lambda done: bar.update(task, completed=done)
                    )
                    console.print(
                        f"  measured capacity of one worker: {capacity:,.0f} events/s "
                        f"(rounds: {' / '.join(f'{r:,.0f}' for r in rounds)}); "
                        f"its producer wrote {producer_eps:,.0f} events/s"
                    )
                    scenario = scenario.sized(capacity, producer_eps)
                    lap("calibration")
                if not scenario.derived:
                    scenario = scenario.sized(float(scenario.capacity_eps or 0))
            d = scenario.derived
            console.print(
                f"  {arm}: spike {d['spike_eps']:,.0f} ev/s = {scenario.spike_factor:g} x quota {d['quota_eps']:,.0f}"
                f"{' (the ceiling: a share of what the producer wrote)' if d.get('spike_capped') else ''}; "
                f"{scenario.projects - 1} others at {d['base_eps_per_project']:,.1f} ev/s each"
            )
            if prepared is None:
                task = bar.add_task(f"{arm}: creating {scenario.projects} projects", total=scenario.projects)
                keys = create_projects(stack, scenario, lambda done: bar.update(task, completed=done))
                lap("create_projects")
            summary, series = replay(
                stack,
                scenario,
                keys,
                mode,
                out / f"requests-{arm}.npz",
                bar,
                lap,
                lambda: on_settled(scenario),
                stopping.start,
            )
        finally:
            task = bar.add_task(f"{arm}: stopping", total=None)
            if stopping.ident is not None:  # started by ``replay`` once it had read S3
                stopping.join()
            else:
                stack.stop()
            bar.update(task, total=1, completed=1)
    lap("stop")
    summary["phase_seconds"] = phases
    console.print(f"  {arm}: " + ", ".join(f"{phase} {seconds:g} s" for phase, seconds in phases.items()))
    return summary, series, scenario


def _spawn_traffic(config: dict[str, Any]) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("spawn").Process(target=run_traffic, args=(config,), name="replay-traffic")
    process.start()
    return process


def calibrate(stack: ArmStack, scenario: Scenario, out: Path, on_progress: Any) -> tuple[float, list[float], float]:
    """Capacity = how fast the worker's sink reads a backlog of the spike's Kafka records that it
    has to itself (:func:`backlog_rate`): the producer writes for ``calibration_seconds``, then
    stops, and the sink's ``events_in`` counter is sampled until it has read them all. The best of
    ``CALIBRATION_ROUNDS`` rounds (the figure and each round's, for the console): what slows a round
    (the add-ons' caches still cold, a stall of the machine) only ever lowers it. Third: the best
    rate at which the rounds' producer wrote (events/s), which bounds the spike
    (``Scenario.producer_share``).

    Two earlier designs measured 17,000-64,000 events/s on this machine from run to run: timed by
    S3 objects less the window close, a sink behind by less than window + lateness looked as fast
    as the writers; timed by the counter while the writers still wrote, the worker's share of two
    cores depended on how much of them the writers took. A spike sized from a high figure saturated
    the whole machine (writers, broker and S3 server included), protection or not.
    """
    key = stack.create_project(CALIBRATION_PROJECT, 1e9)
    rates, written = [], []
    for round_no in range(CALIBRATION_ROUNDS):
        path = out / f"requests-calibration-{round_no + 1}.npz"
        config = _traffic_config(stack, scenario, {CALIBRATION_PROJECT: key}, {CALIBRATION_PROJECT: "kafka"}, path)
        config["writers"][0]["seq"] = round_no << 28  # ids unique across rounds
        config.update(mode="calibrate", duration=scenario.calibration_seconds)
        offset = round_no * scenario.calibration_seconds
        rate, accepted = _backlog_round(stack, config, path, lambda done, offset=offset: on_progress(offset + done))
        rates.append(rate)
        written.append(accepted / scenario.calibration_seconds)
    return max(rates), rates, max(written)


def _backlog_round(stack: ArmStack, config: dict[str, Any], path: Path, on_progress: Any) -> tuple[float, int]:
    """(the sink's rate on the round's backlog, the events the producer wrote)."""
    before = sink_events_read(stack.web) or 0
    started = time.time()
    process = _spawn_traffic(config)
    while process.is_alive():
        on_progress(min(config["duration"], time.time() - started))
        time.sleep(0.1)
    accepted = int(RequestTable.load(str(path)).ok.sum())
    samples: list[tuple[float, int]] = []
    deadline = time.time() + 120
    while time.time() < deadline:
        read = sink_events_read(stack.web)
        if read is not None:
            samples.append((time.time() - started, read - before))
            if read - before >= accepted:
                break
        time.sleep(0.05)
    return backlog_rate(samples, accepted), accepted


def _traffic_config(
    stack: ArmStack, scenario: Scenario, keys: dict[str, str], channels: dict[str, str], path: Path
) -> dict[str, Any]:
    names = list(keys)
    base_index = scenario.projects if names == [CALIBRATION_PROJECT] else 0
    return {
        "web": stack.web,
        "bootstrap": stack.bootstrap,
        "topic": stack.topic,
        "tick_seconds": scenario.tick_seconds,
        "http_timeout_seconds": scenario.http_timeout_seconds,
        "batch_size": scenario.batch_size,
        "kafka_batch_size": scenario.kafka_batch_size,
        "spike_kafka_share": scenario.spike_kafka_share,
        "single_write_max_eps": scenario.single_write_max_eps,
        "spike_connections": scenario.spike_connections,
        "other_connections": scenario.other_connections,
        "writers": [
            {
                "name": name,
                "index": base_index + i,
                "key": keys[name],
                "channel": channels[name],
                "addons": scenario.spike_addons and name in (scenario.spiking_project, CALIBRATION_PROJECT),
            }
            for i, name in enumerate(names)
        ],
        "out": str(path),
    }


def replay(
    stack: ArmStack,
    scenario: Scenario,
    keys: dict[str, str],
    mode: str,
    path: Path,
    bar: Any,
    lap: Callable[[str], None] = lambda phase: None,
    on_settled: Callable[[], None] = lambda: None,
    on_read: Callable[[], None] = lambda: None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the traffic with the watchers on, wait for S3 to have every accepted event, analyse;
    ``lap(phase)`` is called as each phase ends (traffic, settle, analysis), ``on_settled()`` before
    the analysis, ``on_read()`` once the arm's S3 objects are read (the stack is no longer needed)."""
    d = scenario.derived
    t0 = time.time() + 1.0
    config = _traffic_config(stack, scenario, keys, scenario.channels(), path)
    config.update(
        mode="replay",
        t0=t0,
        duration=scenario.traffic_seconds,
        spiking_project=scenario.spiking_project,
        spike_start=scenario.spike_start,
        spike_end=scenario.spike_end,
        spike_ramp_seconds=scenario.spike_ramp_seconds,
        spike_eps=d["spike_eps"],
        base_eps=d["base_eps_per_project"],
    )
    watcher = S3Watcher(
        stack.s3_client(),
        stack.bucket,
        stack.prefix,
        poll=scenario.s3_poll_seconds,
        exclude=(CALIBRATION_PROJECT,),
        local_clock=not stack.external,
    )
    shed = ShedWatcher(stack.web)
    notices = ObjectNotices(stack.bootstrap, stack.objects_topic, watcher.noticed)
    watcher.start()
    notices.start()
    shed.start()
    process = _spawn_traffic(config)
    arm = stack.arm
    phases = [
        (f"{arm}: warm-up", 0.0, scenario.spike_start),
        (f"{arm}: spike ({scenario.spike_factor:g}x quota)", scenario.spike_start, scenario.spike_end),
        (f"{arm}: after the spike", scenario.spike_end, scenario.traffic_seconds),
    ]
    for label, start, end in phases:
        task = bar.add_task(label, total=end - start)
        while time.time() < t0 + end and process.is_alive():
            bar.update(task, completed=max(0.0, min(end - start, time.time() - t0 - start)))
            time.sleep(0.2)
        bar.update(task, completed=end - start)
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"the traffic generator failed (exit code {process.exitcode})")
    lap("traffic")
    table = RequestTable.load(str(path))
    acked = table.ok > 0
    accepted = expand_ids(table.project[acked], table.first[acked], table.ok[acked])
    task = bar.add_task(f"{arm}: waiting for S3 to hold every accepted event", total=len(np.unique(accepted)))
    settled = settle(
        watcher,
        accepted,
        time.time() + scenario.settle_seconds,
        lambda found, total: bar.update(task, completed=found, total=total),
    )
    lap("settle")
    watcher.stop()
    notices.stop()
    shed.stop()
    on_settled()
    watcher.list_once()
    watcher.read_new()
    on_read()
    summary, series = analyse_arm(
        scenario,
        table,
        watcher.events(),
        shed.periods(scenario.spiking_project),
        shed.decisions(scenario.spiking_project),
        t0,
        shed_mode=mode,
        settled=settled,
    )
    summary["s3_listing"] = {
        "objects": len(watcher.first_seen),
        "poll_seconds": scenario.s3_poll_seconds,
        "found_by_notice": watcher.found_by_notice,
        "failed_requests": watcher.errors,
        "notice_errors": notices.errors,
        "last_modified_subsecond": watcher.last_modified_resolution() > 0,
        "visible_time": (
            "min(found (HEAD after its notice, or listed), LastModified + 1 s)"
            if watcher.local_clock
            else "found (HEAD after its notice, or listed)"
        ),
    }
    lap("analysis")
    return summary, series
