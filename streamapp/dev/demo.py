"""Demo traffic for ``streamapp dev --demo``: ~20 projects created through the admin API, steady
traffic for all of them through the Keen-compatible HTTP API, and a periodic 20x spike for one.

Runs in a background thread with its own event loop, so ``streamapp dev`` keeps its simple
synchronous main loop. Prints a working ``curl`` line once the projects exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from streamapp.api import curl_example


@dataclass
class DemoStats:
    requests: int = 0
    events_accepted: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def count(self, status: int, events: int) -> None:
        self.requests += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status in (200, 201):
            self.events_accepted += events


class DemoTraffic:
    """``start()`` / ``stop()``; everything else happens in a daemon thread."""

    def __init__(
        self,
        bootstrap: str,
        web_url: str,
        admin_token: str,
        events_topic: str,
        *,
        projects: int = 20,
        eps_per_project: float = 20.0,
        quota_eps: float = 100.0,
        spike_factor: float = 20.0,
        spike_every: float = 60.0,
        spike_length: float = 20.0,
        first_spike_after: float = 15.0,
        tick: float = 0.25,
        quiet: bool = False,
    ) -> None:
        self.bootstrap = bootstrap  # kept for symmetry with `streamapp produce`: the demo goes through HTTP
        self.events_topic = events_topic
        self.web = web_url.rstrip("/")
        self.admin_token = admin_token
        self.project_ids = [f"demo-{i:02d}" for i in range(projects)]
        self.spiking = self.project_ids[0]
        self.eps_per_project = eps_per_project
        self.quota_eps = quota_eps
        self.spike_factor = spike_factor
        self.spike_every = spike_every
        self.spike_length = spike_length
        self.first_spike_after = first_spike_after
        self.tick = tick
        self.quiet = quiet
        self.keys: dict[str, str] = {}
        self.stats = DemoStats()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="streamapp-demo", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if not self.quiet and self.stats.requests:
            codes = ", ".join(f"{k}: {v}" for k, v in sorted(self.stats.statuses.items()))
            print(f"[demo] {self.stats.events_accepted} events accepted in {self.stats.requests} requests ({codes})")

    def spike_active(self, elapsed: float) -> bool:
        if elapsed < self.first_spike_after:
            return False
        return (elapsed - self.first_spike_after) % self.spike_every < self.spike_length

    # ------------------------------------------------------------------ thread
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported, the dev stack keeps running
            self.error = exc
            if not self.quiet:
                print(f"[demo] stopped: {exc!r}", flush=True)

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    async def _main(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            for project_id in self.project_ids:
                if self._stop.is_set():
                    return
                self.keys[project_id] = await self._create(session, project_id)
            self.ready.set()
            example = self.project_ids[1] if len(self.project_ids) > 1 else self.spiking
            curl = curl_example(self.web, example, self.keys[example])
            self._say(
                f"[demo] {len(self.project_ids)} projects created (quota {self.quota_eps:g} ev/s each); "
                f"{self.spiking} spikes {self.spike_factor:g}x for {self.spike_length:g}s every "
                f"{self.spike_every:g}s. Record an event yourself:\n  {curl}"
            )
            await self._traffic(session)

    async def _create(self, session: aiohttp.ClientSession, project_id: str) -> str:
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        body = {"project_id": project_id, "s3_streaming": True, "quota_eps": self.quota_eps}
        deadline = time.monotonic() + 60
        while True:
            async with session.post(f"{self.web}/admin/projects", json=body, headers=headers) as resp:
                payload: dict[str, Any] = await resp.json(content_type=None)
                if resp.status == 201:
                    return str(payload["write_key"])
                if resp.status == 409:  # already there (e.g. a restarted demo): keys are kept only
                    # as hashes, so take a new one (the old one, if any client still has it, ends now)
                    rotate = f"{self.web}/admin/projects/{project_id}/key"
                    async with session.post(rotate, json={"grace_seconds": 0}, headers=headers) as got:
                        if got.status == 200:
                            return str((await got.json(content_type=None))["write_key"])
                if resp.status != 503 or time.monotonic() > deadline:
                    raise RuntimeError(f"creating {project_id}: HTTP {resp.status} {payload}")
            await asyncio.sleep(1.0)

    async def _traffic(self, session: aiohttp.ClientSession) -> None:
        rng = random.Random(5)
        carry = dict.fromkeys(self.project_ids, 0.0)
        seq = dict.fromkeys(self.project_ids, 0)
        started = time.monotonic()
        was_spiking = False
        tick_no = 0
        while not self._stop.is_set():
            elapsed = time.monotonic() - started
            spiking = self.spike_active(elapsed)
            if spiking != was_spiking:
                was_spiking = spiking
                rate = self.eps_per_project * (self.spike_factor if spiking else 1)
                self._say(f"[demo] {self.spiking}: {'SPIKE' if spiking else 'back to normal'} ({rate:g} ev/s)")
            sends = []
            for project_id in self.project_ids:
                factor = self.spike_factor if spiking and project_id == self.spiking else 1.0
                carry[project_id] += self.eps_per_project * factor * self.tick
                count = int(carry[project_id])
                carry[project_id] -= count
                if count == 0:
                    continue
                collection = "pageviews" if rng.random() < 0.7 else "clicks"
                events = []
                for _ in range(count):
                    seq[project_id] += 1
                    events.append(
                        {"n": seq[project_id], "page": f"/p/{rng.randrange(50)}", "user": {"id": rng.randrange(10**6)}}
                    )
                sends.append(self._send(session, project_id, {collection: events}, count))
            if sends:
                await asyncio.gather(*sends)
            tick_no += 1
            await asyncio.sleep(max(0.0, started + tick_no * self.tick - time.monotonic()))

    async def _send(self, session: aiohttp.ClientSession, project_id: str, body: dict[str, Any], n: int) -> None:
        url = f"{self.web}/3.0/projects/{project_id}/events"
        status = 0
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.post(url, json=body, headers={"Authorization": self.keys[project_id]}) as resp:
                await resp.read()
                status = resp.status
        self.stats.count(status, n)
