"""How a replay is shown: progress bars and the side-by-side table (rich), PNG plots (matplotlib,
Agg backend) and a self-contained ``report.html`` (plots embedded as base64, opens from disk)."""

from __future__ import annotations

import base64
import html
import json
import os
import platform
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ARM_COLORS = {"baseline": "tab:red", "protected": "tab:blue"}


def console() -> Console:
    return Console()


def progress(out: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=out,
    )


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    mem = 0
    try:
        with open("/proc/meminfo") as fh:
            mem = int(fh.readline().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpus": os.cpu_count(),
        "memory_mib": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_end": [round(x, 2) for x in load],
    }


def claims(doc: dict[str, Any]) -> dict[str, Any]:
    """The issue's invariants, evaluated on the summary (B = window + lateness + idle flush + 5 s)."""
    bound = float(doc["scenario"]["bound_seconds"])
    runs = doc["runs"]
    out: dict[str, Any] = {"bound_seconds": bound}
    protected = runs.get("protected")
    baseline = runs.get("baseline")
    if protected:
        p99 = protected["other_projects"]["delivery_seconds"]["p99"]
        success = protected["other_projects"]["api"]["success_rate"]
        out["protected_p99_within_bound"] = p99 is not None and p99 <= bound
        out["protected_api_success_at_least_99_9"] = success is not None and success >= 0.999
    if baseline:
        p99 = baseline["other_projects"]["delivery_seconds"]["p99"]
        out["baseline_p99_at_least_twice_bound"] = p99 is not None and p99 >= 2 * bound
    out["exactly_once"] = all(run["events"]["exactly_once"] for run in runs.values())
    return out


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        text = f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        return text + unit
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return str(value)


def table_rows(doc: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(label, one cell per arm) for the side-by-side table."""
    runs = doc["runs"]

    def get(run: dict[str, Any], path: str) -> Any:
        value: Any = run
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    rows = [
        ("shed mode", "shed_mode", ""),
        ("others: delivery p50 during spike", "other_projects.delivery_seconds.p50", " s"),
        ("others: delivery p99 during spike", "other_projects.delivery_seconds.p99", " s"),
        ("others: delivery max during spike", "other_projects.delivery_seconds.max", " s"),
        ("others: delivery p99 before spike", "other_projects.delivery_seconds.by_phase.before.p99", " s"),
        ("others: delivery p99 after spike", "other_projects.delivery_seconds.by_phase.after.p99", " s"),
        ("others: API success during spike", "other_projects.api.success_rate", ""),
        ("others: API p50 during spike", "other_projects.api.p50_ms", " ms"),
        ("others: API p99 during spike", "other_projects.api.p99_ms", " ms"),
        ("others: API 429 / 503 / no answer", None, ""),
        ("spiker: detection", "spiking_project.detection_seconds", " s"),
        ("spiker: in-quota delivery p99", "spiking_project.in_quota_delivery_seconds.p99", " s"),
        ("spiker: catch-up after spike end", "spiking_project.catch_up_seconds", " s"),
        ("spiker: drain rate (x live rate)", "spiking_project.drain.multiple_of_live_rate", ""),
        ("spiker: API success during spike", "spiking_project.api.success_rate", ""),
        ("spiker: API 429 / 503", None, ""),
        ("events produced", "events.produced", ""),
        ("events accepted", "events.accepted", ""),
        ("accepted and in S3", "events.in_s3", ""),
        ("in S3 on time / late / delayed", None, ""),
        ("refused at the API", "events.refused_at_api", ""),
        ("dropped by policy", "events.dropped_by_policy", ""),
        ("missing / duplicated", None, ""),
        ("exactly once", "events.exactly_once", ""),
    ]
    out = []
    for label, path, unit in rows:
        cells = []
        for run in runs.values():
            if path is not None:
                cells.append(_fmt(get(run, path), unit))
            elif label.startswith("others: API 429"):
                api = run["other_projects"]["api"]
                cells.append(f"{api['count_429']:,} / {api['count_503']:,} / {api['no_answer']:,}")
            elif label.startswith("spiker: API 429"):
                api = run["spiking_project"]["api"]
                cells.append(f"{api['count_429']:,} / {api['count_503']:,}")
            elif label.startswith("in S3 on time"):
                e = run["events"]
                cells.append(f"{e['on_time']:,} / {e['late']:,} / {e['delayed']:,}")
            else:
                e = run["events"]
                cells.append(f"{e['missing']:,} / {e['duplicated']:,}")
        out.append((label, cells))
    return out


def print_table(out: Console, doc: dict[str, Any]) -> None:
    table = Table(title=f"The incident, replayed (B = {doc['scenario']['bound_seconds']:g} s)")
    table.add_column("")
    for arm in doc["runs"]:
        table.add_column(arm, justify="right")
    for label, cells in table_rows(doc):
        table.add_row(label, *cells)
    out.print(table)
    for name, value in doc["claims"].items():
        if isinstance(value, bool):
            out.print(f"  {name}: {'[green]yes[/]' if value else '[red]no[/]'}")


def markdown_table(doc: dict[str, Any]) -> str:
    """The same table in Markdown (for the README)."""
    arms = list(doc["runs"])
    lines = ["| | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in table_rows(doc)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plots


def _shade(ax: Any, doc: dict[str, Any], arm: str) -> None:
    scenario = doc["scenario"]
    ax.axvspan(scenario["spike_start_seconds"], scenario["spike_end_seconds"], color="0.9", zorder=0)
    for start, end in doc["runs"][arm]["spiking_project"]["shed_periods_seconds"]:
        ax.axvspan(start, end, color=ARM_COLORS.get(arm, "tab:gray"), alpha=0.12, zorder=0)


def plots(doc: dict[str, Any], series: dict[str, Any], out: Path) -> list[Path]:
    # matplotlib is imported only to draw (~1 s): the CLI imports this module on every start.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bound = doc["scenario"]["bound_seconds"]
    arms = list(series)
    paths = []

    fig, axes = plt.subplots(len(arms), 1, figsize=(10, 3.2 * len(arms)), sharex=True, squeeze=False)
    for ax, arm in zip(axes[:, 0], arms, strict=True):
        s = series[arm]
        _shade(ax, doc, arm)
        ax.plot(s["seconds"], s["offered_eps"]["spiking"], color="tab:orange", lw=1, ls="--", label="spiking: offered")
        ax.plot(s["seconds"], s["accepted_eps"]["spiking"], color="tab:orange", lw=1.5, label="spiking: accepted")
        ax.plot(s["seconds"], s["accepted_eps"]["others"], color="tab:green", lw=1.5, label="other projects: accepted")
        ax.set_ylabel("events/s")
        ax.set_title(f"{arm}: ingest rate per project (grey: spike, tint: project shed)")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since traffic start")
    paths.append(_save(fig, out / "ingest_rate.png"))

    fig, ax = plt.subplots(figsize=(10, 4))
    scenario = doc["scenario"]
    ax.axvspan(scenario["spike_start_seconds"], scenario["spike_end_seconds"], color="0.9", zorder=0)
    for arm in arms:
        s = series[arm]
        ax.plot(s["seconds"], s["other_delivery_p99"], color=ARM_COLORS.get(arm), lw=1.5, label=f"{arm}: p99")
        ax.plot(s["seconds"], s["other_delivery_p50"], color=ARM_COLORS.get(arm), lw=1, ls=":", label=f"{arm}: p50")
    ax.axhline(bound, color="k", lw=0.8, ls="--", label=f"B = {bound:g} s")
    ax.axhline(2 * bound, color="0.4", lw=0.8, ls="-.", label=f"2B = {2 * bound:g} s")
    ax.set_xlabel("event time, seconds since traffic start")
    ax.set_ylabel("event time → visible in S3 (s)")
    ax.set_title("Other projects' delivery latency (grey: spike)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "delivery_latency.png"))

    fig, ax = plt.subplots(figsize=(10, 4))
    ax.axvspan(scenario["spike_start_seconds"], scenario["spike_end_seconds"], color="0.9", zorder=0)
    for arm in arms:
        s = series[arm]
        ax.plot(s["seconds"], s["export_backlog"], color=ARM_COLORS.get(arm), lw=1.5, label=arm)
    ax.set_xlabel("seconds since traffic start")
    ax.set_ylabel("accepted events not yet in S3")
    ax.set_title("Export backlog (everything accepted, real-time and delayed lanes)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "export_backlog.png"))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for ax in (top, bottom):
        ax.axvspan(scenario["spike_start_seconds"], scenario["spike_end_seconds"], color="0.9", zorder=0)
    for arm in arms:
        s = series[arm]
        success = [None if v is None else 100 * v for v in s["other_api_success"]]
        top.plot(s["seconds"], success, color=ARM_COLORS.get(arm), lw=1.5, label=arm)
        bottom.plot(s["seconds"], s["other_api_p99_ms"], color=ARM_COLORS.get(arm), lw=1.5, label=arm)
    top.set_ylabel("success (%)")
    top.set_title("Other projects' HTTP writes: success rate and p99 latency per second")
    top.legend(fontsize=8)
    bottom.set_ylabel("p99 (ms)")
    bottom.set_yscale("log")
    bottom.set_xlabel("seconds since traffic start")
    paths.append(_save(fig, out / "api.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------- html


def write_html(doc: dict[str, Any], pngs: list[Path], path: Path) -> None:
    """One file: the table, the claims, the plots as data: URIs, and the scenario."""
    arms = list(doc["runs"])
    head = "".join(f"<th>{html.escape(a)}</th>" for a in arms)
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for label, cells in table_rows(doc)
    )
    claims = "".join(
        f"<li>{html.escape(k)}: <b>{'yes' if v else 'no'}</b></li>"
        for k, v in doc["claims"].items()
        if isinstance(v, bool)
    )
    images = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.stem)}</figcaption></figure>'
        for p in pngs
    )
    scenario = html.escape(_json(doc["scenario"]))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>streamapp replay</title>
<style>body{{font-family:sans-serif;max-width:1060px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px}}td:not(:first-child){{text-align:right}}img{{max-width:100%}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>
<h1>The 2019 incident, replayed</h1>
<p>Same traffic twice: <b>baseline</b> (shadow mode: the spike is detected but nothing is shed, every event
flows through the real-time path) and <b>protected</b> (the defaults). B = window + lateness + idle flush
+ 5 s = {doc["scenario"]["bound_seconds"]:g} s.</p>
<table><tr><th></th>{head}</tr>{rows}</table>
<ul>{claims}</ul>
{images}
<h2>Scenario</h2><pre>{scenario}</pre>
<h2>Machine</h2><pre>{html.escape(_json(doc["machine"]))}</pre>
</body></html>
"""
    path.write_text(page)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2)
