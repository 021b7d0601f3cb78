"""``streamapp replay``: the 2019 incident, replayed twice on this machine — baseline (shadow mode:
every event flows through the real-time path) and protected (the defaults) — with the same traffic.

Per arm (:mod:`streamapp.replay.arm`): fresh stack, worker, (baseline only) a calibration that times
the worker on a backlog of the spike's records and sizes the spike from it, projects created through
the admin API, the traffic (in its own process), then reading S3 until every accepted event is
there, and the analysis; the protected arm's stack starts while the baseline is analysed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import streamapp.replay.report as report
from streamapp.replay.arm import PreparedArm, arm_stack, prepare_arm, run_arm
from streamapp.replay.scenario import Scenario, quick

ARMS = (("baseline", "shadow"), ("protected", "divert"))


def configure(parser: argparse.ArgumentParser) -> None:
    d = Scenario()
    parser.add_argument("--out", default="replay-out", help="output directory (summary.json, report.html, PNGs)")
    parser.add_argument(
        "--quick", action="store_true", help="short version (~2 minutes): 10 projects, small windows and phases"
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
        help=f"the spike's events ask for the add-ons of Keen's auto-collector (default {d.spike_addons})",
    )
    parser.add_argument(
        "--drain-share",
        type=float,
        default=None,
        help=f"overflow drain ceiling / measured capacity, protected arm (default {d.drain_share:g})",
    )
    parser.add_argument(
        "--drain-floor-share",
        type=float,
        default=None,
        help=f"overflow drain floor / measured capacity, protected arm (default {d.drain_floor_share:g})",
    )
    parser.add_argument(
        "--drain-processes",
        type=int,
        default=None,
        help=f"processes the drain exports diverted events in, 0 = the worker's loop (default {d.drain_processes})",
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
    "drain_floor_share": "drain_floor_share",
    "drain_processes": "drain_processes",
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
    # The next arm's stack starts (and its worker joins its group) while this arm is analysed.
    with ThreadPoolExecutor(1, thread_name_prefix="next-arm") as pool:
        prepared: Future[PreparedArm] | None = None
        try:
            for i, (arm, mode) in enumerate(arms):
                following = arms[i + 1] if i + 1 < len(arms) else None

                def prepare_next(sized: Scenario, following: tuple[str, str] | None = following) -> None:
                    nonlocal prepared
                    if following is not None:
                        stack = arm_stack(*following, sized, out, args.external)
                        prepared = pool.submit(prepare_arm, stack, sized)

                current, prepared = prepared, None
                summary, arm_series, scenario = run_arm(
                    arm, mode, scenario, out, args.external, console, prepared=current, on_settled=prepare_next
                )
                runs[arm] = summary
                series[arm] = arm_series
        finally:
            if prepared is not None:  # an arm failed after the next one's stack was started
                _stop_prepared(prepared)
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


def _stop_prepared(prepared: Future[PreparedArm]) -> None:
    with contextlib.suppress(Exception):  # failed to start: prepare_arm stopped it already
        prepared.result().stack.stop()
