"""HTTP ingestion API throughput and latency, measured with a real HTTP load generator.

    .venv/bin/python benchmarks/bench_api.py [--rate 20000] [--duration 10] [--batch 100]

Starts an embedded Tansu broker + moto S3 + one streamapp worker (the worker also runs its S3
sink and meter on everything it accepts, as in production), creates projects through the admin
API, then drives the Keen batch endpoint from a *separate process* (aiohttp client on uvloop):

1. fixed rate: ``--rate`` events/s for ``--duration`` s, ``--batch`` events per request, open loop
   (each request is due at a fixed time; latency is counted from that time, so a server falling
   behind cannot hide its queueing: no coordinated omission);
2. 429: a project under a manual shed override, single-event requests; the server-side time comes
   from the ``X-Streamapp-Server-Ms`` header that the API sets inside the handler;
3. saturation: ``--connections`` closed-loop connections as fast as the worker answers (last, as
   the worker's sink keeps catching up for a while after it).

Prints a table (``--json`` for one JSON object) with events/s, p50/p99/max latency and the 429
latency, plus the worker's CPU use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ADMIN_TOKEN = "bench-admin-token"


# --------------------------------------------------------------------------- load generator (child process)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _bodies(batch: int, variants: int = 16) -> list[bytes]:
    """Pre-serialized batch bodies of ~180-byte events (the client must not be the bottleneck)."""
    import orjson

    out = []
    for v in range(variants):
        events = [
            {
                "n": v * batch + i,
                "page": f"/products/{(v * 31 + i) % 500}",
                "user": {"id": (v * 7919 + i * 104729) % 1_000_000, "plan": "pro" if i % 3 else "free"},
                "referrer": "https://example.com/search?q=shoes",
                "duration_ms": (i * 37) % 5000,
            }
            for i in range(batch)
        ]
        out.append(orjson.dumps({"pageviews": events}))
    return out


def run_load(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point of the load-generator process."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_load(config))


async def _load(config: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    mode = config["mode"]
    web = config["web"]
    targets: list[tuple[str, str]] = config["targets"]  # (project, key)
    duration = float(config["duration"])
    batch = int(config.get("batch", 1))
    if mode == "shed":
        bodies = [b'{"page": "/home", "user": {"id": 42}}']
    else:
        bodies = _bodies(batch)
    latencies: list[float] = []
    slow_at: dict[int, int] = {}  # second of the run -> requests slower than 50 ms due then
    server_ms: list[float] = []
    statuses: dict[int, int] = {}
    accepted_events = 0
    connector = aiohttp.TCPConnector(limit=int(config.get("connections", 64)), force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i: int, due: float) -> None:
            nonlocal accepted_events
            project, key = targets[i % len(targets)]
            if mode == "shed":
                url = f"{web}/3.0/projects/{project}/events/pageviews"
            else:
                url = f"{web}/3.0/projects/{project}/events"
            headers = {"Authorization": key, "Content-Type": "application/json"}
            try:
                async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as resp:
                    await resp.read()
                    status = resp.status
                    server = resp.headers.get("X-Streamapp-Server-Ms")
            except (aiohttp.ClientError, TimeoutError):
                status, server = 0, None
            latency = time.perf_counter() - due
            latencies.append(latency)
            if latency > 0.05:
                second = int(due - started)
                slow_at[second] = slow_at.get(second, 0) + 1
            statuses[status] = statuses.get(status, 0) + 1
            if server is not None:
                server_ms.append(float(server))
            if status in (200, 201):
                accepted_events += batch if mode != "shed" else 1

        if mode == "rate":
            interval = batch / float(config["rate"])
            tasks = []
            i = 0
            while True:
                due = started + i * interval
                if due - started >= duration:
                    break
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(i, due)))
                i += 1
            await asyncio.gather(*tasks)
        else:  # closed loop: "saturate" (batch endpoint) or "shed" (single events)
            counter = iter(range(10**9))

            async def worker() -> None:
                while time.perf_counter() - started < duration:
                    await one(next(counter), time.perf_counter())

            await asyncio.gather(*(worker() for _ in range(int(config["connections"]))))
        elapsed = time.perf_counter() - started
    return {
        "mode": mode,
        "elapsed": elapsed,
        "requests": len(latencies),
        "statuses": statuses,
        "accepted_events": accepted_events,
        "events_per_s": accepted_events / elapsed,
        "p50_ms": _percentile(latencies, 0.50) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "max_ms": max(latencies, default=float("nan")) * 1000,
        "server_p50_ms": _percentile(server_ms, 0.50),
        "server_p99_ms": _percentile(server_ms, 0.99),
        "server_max_ms": max(server_ms, default=float("nan")),
        "slow_requests_by_second": dict(sorted(slow_at.items())),
    }


# --------------------------------------------------------------------------- orchestration (parent)


def _admin(web: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    request = urllib.request.Request(web + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _worker_pid(worker: Any) -> int:
    """The Python worker process (the WorkerProcess child itself)."""
    return int(worker.pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20_000, help="events/s of the fixed-rate phase")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--batch", type=int, default=100, help="events per batch request")
    parser.add_argument("--projects", type=int, default=8, help="projects the load is spread over")
    parser.add_argument("--connections", type=int, default=32, help="connections of the saturation phase")
    parser.add_argument("--shed-duration", type=float, default=3.0)
    parser.add_argument("--window-seconds", type=int, default=30, help="the worker's S3 window length")
    parser.add_argument("--skip-saturation", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()

    from streamapp.dev import DevStack

    log_dir = Path(tempfile.mkdtemp(prefix="bench-api-"))
    results: dict[str, Any] = {"config": vars(args)}
    with DevStack(log_dir) as stack:
        extra: dict[str, Any] = {}
        if os.environ.get("BENCH_WORKER_CMD"):  # diagnosis: e.g. a worker with an event-loop lag monitor
            extra["command"] = os.environ["BENCH_WORKER_CMD"].split()
        worker = stack.worker(
            {
                "admin_token": ADMIN_TOKEN,
                "data_dir": log_dir / "worker-data",
                "window_seconds": args.window_seconds,
                "allowed_lateness_seconds": 5,
                "log_level": "warn",
            },
            **extra,
        )
        worker.start()
        try:
            worker.wait_ready(120)
            web = worker.web_url
            targets = []
            for i in range(args.projects):
                created = _admin(web, "POST", "/admin/projects", {"project_id": f"bench-{i}", "quota_eps": 1e9})
                targets.append((created["project_id"], created["write_key"]))
            shed = _admin(web, "POST", "/admin/projects", {"project_id": "bench-shed", "quota_eps": 1})
            _admin(web, "POST", "/admin/projects/bench-shed/shed", {"reason": "benchmark"})
            base = {"web": web, "targets": targets, "batch": args.batch}
            pid = _worker_pid(worker)
            ctx = get_context("spawn")
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                # warm-up: connections, producer batches, JIT-free but caches and metadata
                pool.submit(run_load, {**base, "mode": "rate", "rate": args.rate / 2, "duration": 2}).result()
                time.sleep(1)

                def phase(name: str, config: dict[str, Any]) -> None:
                    cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
                    out = pool.submit(run_load, config).result()
                    out["worker_cpu_percent"] = 100 * (_cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)
                    results[name] = out
                    time.sleep(2)

                phase("fixed_rate", {**base, "mode": "rate", "rate": args.rate, "duration": args.duration})
                phase(
                    "shed_429",
                    {
                        **base,
                        "mode": "shed",
                        "targets": [(shed["project_id"], shed["write_key"])],
                        "connections": 4,
                        "duration": args.shed_duration,
                    },
                )
                if not args.skip_saturation:  # last: the sink needs a while to catch up afterwards
                    phase(
                        "saturation",
                        {**base, "mode": "saturate", "connections": args.connections, "duration": args.duration},
                    )
            results["sink"] = json.loads(urllib.request.urlopen(f"{web}/sink/", timeout=10).read())
        finally:
            worker.stop()
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print(render(results))
    return 0


def render(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [
        f"streamapp HTTP API benchmark: 1 worker, batch {cfg['batch']} events/request, {cfg['projects']} projects, "
        f"{os.cpu_count()} CPUs (broker, S3, worker and load generator share them)",
        "",
        f"{'phase':<34} {'events/s':>10} {'requests':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'srv p50':>8} {'srv p99':>8} {'worker CPU':>10}  statuses",
    ]
    names = {
        "fixed_rate": f"fixed rate {cfg['rate']:.0f} ev/s (open loop)",
        "shed_429": "shed project: 429 (single events)",
        "saturation": f"saturation ({cfg['connections']} connections)",
    }
    for key, label in names.items():
        r = results.get(key)
        if not r:
            continue
        events = r["events_per_s"] if key != "shed_429" else r["requests"] / r["elapsed"]
        unit = "" if key != "shed_429" else " req/s"
        lines.append(
            f"{label:<34} {events:>10.0f} {r['requests']:>9} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{r['max_ms']:>8.1f} {r['server_p50_ms']:>8.3f} {r['server_p99_ms']:>8.3f} "
            f"{r['worker_cpu_percent']:>9.0f}%  {dict(sorted(r['statuses'].items()))}{unit}"
        )
    shed = results.get("shed_429", {})
    lines += [
        "",
        "latency = client-side from the request's due time; srv = X-Streamapp-Server-Ms (inside the handler)",
        f"429 answered in {shed.get('server_p50_ms', float('nan')):.3f} ms (p50) / "
        f"{shed.get('server_p99_ms', float('nan')):.3f} ms (p99) server-side",
        f"sink: {results.get('sink', {}).get('events_in', '?')} events read back by the worker's S3 sink",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
