"""``streamapp replay``: the 2019 incident, replayed twice on this machine — baseline (shadow mode:
every event flows through the real-time path) and protected (the defaults) — with the same traffic.

Per arm: fresh stack, worker, (baseline only) a calibration that times the worker on a backlog of
the spike's records and sizes the spike from it, projects created through the admin API, the traffic
(in its own process), then reading S3 until every accepted event is there, and the analysis.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

import streamapp.replay.report as report
from streamapp.replay.analysis import RequestTable, analyse_arm, backlog_rate, expand_ids
from streamapp.replay.measure import S3Watcher, ShedWatcher, settle, sink_events_read
from streamapp.replay.scenario import Scenario, quick
from streamapp.replay.stack import ArmStack
from streamapp.replay.traffic import run_traffic

ARMS = (("baseline", "shadow"), ("protected", "divert"))
CALIBRATION_PROJECT = "calib"
#: Backlogs the calibration times, one after the other; the best counts (``calibrate``).
CALIBRATION_ROUNDS = 2


def configure(parser: argparse.ArgumentParser) -> None:
    d = Scenario()
    parser.add_argument("--out", default="replay-out", help="output directory (summary.json, report.html, PNGs)")
    parser.add_argument(
        "--quick", action="store_true", help="short version (about 2.5 minutes): small windows and phases"
    )
    parser.add_argument("--external", action="store_true", help="use the configured STREAMAPP_KAFKA_*/S3 settings")
    parser.add_argument("--projects", type=int, default=None, help=f"projects (default {d.projects})")
    parser.add_argument("--spike-factor", type=float, default=None, help=f"spike, x quota (default {d.spike_factor:g})")
    parser.add_argument("--spike-seconds", type=float, default=None)
    parser.add_argument("--warmup-seconds", type=float, default=None)
    parser.add_argument("--after-seconds", type=float, default=None)
    parser.add_argument("--window-seconds", type=int, default=None)
    parser.add_argument("--lateness-seconds", type=int, default=None)
    parser.add_argument("--idle-flush-seconds", type=float, default=None)
    parser.add_argument("--overload", type=float, default=None, help="spike rate as a multiple of measured capacity")
    parser.add_argument("--base-load", type=float, default=None, help="other projects' total rate / capacity")
    parser.add_argument("--spike-kafka-share", type=float, default=None, help="share of the spike sent to Kafka")
    parser.add_argument("--capacity-eps", type=float, default=None, help="skip the calibration: capacity, events/s")
    parser.add_argument("--settle-seconds", type=float, default=None)
    parser.add_argument(
        "--calibration-seconds", type=float, default=None, help="how long the calibration writes its backlog (3)"
    )
    parser.add_argument("--spike-connections", type=int, default=None, help="HTTP connections of the spiking client")
    parser.add_argument(
        "--spike-addons",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"the spike's events ask for Keen's ua/url/referrer add-ons (default {d.spike_addons})",
    )
    parser.add_argument(
        "--drain-share",
        type=float,
        default=None,
        help=f"overflow drain ceiling / measured capacity, protected arm (default {d.drain_share:g})",
    )
    parser.add_argument(
        "--spike-ramp-seconds",
        type=float,
        default=None,
        help=f"seconds the spike takes to reach its full rate, 0 = a step (default {d.spike_ramp_seconds:g})",
    )
    parser.add_argument(
        "--burst-horizon-seconds",
        type=int,
        default=None,
        help=f"the meter's burst rate horizon in both arms (default {d.burst_horizon_seconds})",
    )
    parser.add_argument(
        "--s3-poll-seconds", type=float, default=None, help=f"S3 listing interval (default {d.s3_poll_seconds:g})"
    )
    parser.add_argument("--arms", default="baseline,protected", help="comma-separated arms to run")


_FLAG_FIELDS = {
    "projects": "projects",
    "spike_factor": "spike_factor",
    "spike_seconds": "spike_seconds",
    "warmup_seconds": "warmup_seconds",
    "after_seconds": "after_seconds",
    "window_seconds": "window_seconds",
    "lateness_seconds": "allowed_lateness_seconds",
    "idle_flush_seconds": "idle_flush_seconds",
    "overload": "overload",
    "base_load": "base_load",
    "spike_kafka_share": "spike_kafka_share",
    "capacity_eps": "capacity_eps",
    "settle_seconds": "settle_seconds",
    "calibration_seconds": "calibration_seconds",
    "spike_connections": "spike_connections",
    "spike_addons": "spike_addons",
    "drain_share": "drain_share",
    "spike_ramp_seconds": "spike_ramp_seconds",
    "burst_horizon_seconds": "burst_horizon_seconds",
    "s3_poll_seconds": "s3_poll_seconds",
}


def scenario_from(args: argparse.Namespace) -> Scenario:
    scenario = quick(Scenario()) if args.quick else Scenario()
    changes = {field: getattr(args, flag) for flag, field in _FLAG_FIELDS.items() if getattr(args, flag) is not None}
    return replace(scenario, **changes)


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scenario = scenario_from(args)
    arms = [(name, mode) for name, mode in ARMS if name in args.arms.split(",")]
    runs: dict[str, Any] = {}
    series: dict[str, Any] = {}
    console = report.console()
    console.print(f"[bold]streamapp replay[/]: arms {', '.join(a for a, _ in arms)} -> {out}")
    for arm, mode in arms:
        summary, arm_series, scenario = run_arm(arm, mode, scenario, out, args.external, console)
        runs[arm] = summary
        series[arm] = arm_series
    doc = {"scenario": scenario.to_dict(), "machine": report.machine(), "runs": runs}
    doc["claims"] = report.claims(doc)
    (out / "summary.json").write_text(json.dumps(doc, indent=2))
    (out / "series.json").write_text(json.dumps(series))
    pngs = report.plots(doc, series, out)
    report.write_html(doc, pngs, out / "report.html")
    report.print_table(console, doc)
    ok = all(run["events"]["exactly_once"] for run in runs.values())
    console.print(
        f"exactly once in every arm: {'[green]yes[/]' if ok else '[red]NO[/]'}; "
        f"wrote {out / 'summary.json'}, {out / 'report.html'}, {len(pngs)} plots"
    )
    return 0 if ok else 1


def run_arm(
    arm: str, mode: str, scenario: Scenario, out: Path, external: bool, console: Any
) -> tuple[dict[str, Any], dict[str, Any], Scenario]:
    if scenario.capacity_eps is not None and not scenario.derived:
        scenario = scenario.sized(scenario.capacity_eps)  # given: this arm's worker gets the drain ceiling too
    worker_settings: dict[str, object] = {
        "window_seconds": scenario.window_seconds,
        "allowed_lateness_seconds": scenario.allowed_lateness_seconds,
        "idle_flush_seconds": scenario.idle_flush_seconds,
        "shed_mode": mode,
        "health_backlog_seconds": scenario.health_backlog_seconds,
        "burst_horizon_seconds": scenario.burst_horizon_seconds,
    }
    if scenario.derived:
        worker_settings["overflow_max_eps"] = scenario.derived["overflow_max_eps"]
    stack = ArmStack(arm, out / "logs" / arm, worker_settings, external=external)
    phases: dict[str, float] = {}  # wall seconds of each phase of this arm (summary: phase_seconds)
    clock = time.monotonic()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.monotonic()
        phases[phase] = round(now - clock, 2)
        clock = now

    with report.progress(console) as bar:
        task = bar.add_task(f"{arm}: starting broker, S3, worker", total=None)
        stack.start()
        bar.update(task, total=1, completed=1)
        lap("start")
        try:
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
            task = bar.add_task(f"{arm}: creating {scenario.projects} projects", total=scenario.projects)
            keys: dict[str, str] = {}
            with ThreadPoolExecutor(8) as pool:  # each creation waits for the control topic round trip
                futures = {p: pool.submit(stack.create_project, p, d["quota_eps"]) for p in scenario.project_ids()}
                for project, future in futures.items():
                    keys[project] = future.result()
                    bar.update(task, completed=len(keys))
            lap("create_projects")
            summary, series = replay(stack, scenario, keys, mode, out / f"requests-{arm}.npz", bar, lap)
        finally:
            task = bar.add_task(f"{arm}: stopping", total=None)
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
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the traffic with the watchers on, wait for S3 to have every accepted event, analyse;
    ``lap(phase)`` is called as each phase ends (traffic, settle, analysis)."""
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
    watcher.start()
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
    shed.stop()
    watcher.list_once()
    watcher.read_new()
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
        "failed_listings": watcher.errors,
        "last_modified_subsecond": watcher.last_modified_resolution() > 0,
        "visible_time": "min(first listed, LastModified + 1 s)" if watcher.local_clock else "first listed",
    }
    lap("analysis")
    return summary, series
