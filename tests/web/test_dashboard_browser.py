"""The dashboard in a real headless Chromium while a project spikes: it must show up as shed.

Uses Debian's chromium (/usr/bin/chromium, installed by .ci/run) through Playwright; no browser
download. A missing browser is a failure, not a skip. The screenshot is kept in
test-artifacts/dashboard.png.
"""

from __future__ import annotations

import asyncio
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from streamapp.dev import produce_load
from tests.helpers import wait_until

CHROMIUM = os.environ.get("STREAMAPP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
READ_TOKEN = "dash-read"

pytestmark = pytest.mark.integration


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def test_dashboard_shows_the_spiking_project_as_shed(broker, worker_env, start_worker) -> None:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: apt-get install chromium (the CI script does)"
    from playwright.sync_api import sync_playwright

    env = worker_env(
        window_seconds=4,
        allowed_lateness_seconds=1,
        idle_flush_seconds=1,
        default_eps_limit=200,
        shed_cooldown_seconds=60,
        read_token=READ_TOKEN,
    )
    worker = start_worker(env)
    wait_until(lambda: _status(f"{worker.web_url}/readyz") == 200, 45, what="worker ready (assigned, caught up)")
    stop = threading.Event()
    sent: dict[str, Any] = {}

    def traffic() -> None:
        # 5 projects at 40 ev/s; "spiky" jumps to 25x (1000 ev/s) after 3 s against a 200 ev/s quota.
        sent.update(
            asyncio.run(
                produce_load(
                    broker.bootstrap,
                    env["STREAMAPP_EVENTS_TOPIC"],
                    rate=200,
                    projects=["spiky", "web-shop", "mobile-app", "backend", "iot"],
                    duration=60,
                    spikes=[("spiky", 25.0, 3, 60)],
                    should_stop=stop.is_set,
                )
            )
        )

    producer = threading.Thread(target=traffic, daemon=True)
    producer.start()
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(f"{worker.web_url}/#token={READ_TOKEN}")  # a fragment: never sent to the server (#10)
                # Live before the spike: the top table fills with un-shed projects.
                page.wait_for_selector('#top tr[data-project="web-shop"][data-state="ok"]', timeout=20_000)
                # The spike: the row turns shed, and the project is listed among the shed ones.
                row = page.wait_for_selector('#top tr[data-project="spiky"][data-state="shed"]', timeout=30_000)
                assert row is not None
                assert "SHED" in row.inner_text()
                page.wait_for_selector('#shed tr[data-project="spiky"]', timeout=10_000)
                assert page.locator("#shed tbody tr").count() == 1, "only the spiking project is shed"
                assert page.locator('#top tr[data-state="shed"]').count() == 1
                first = page.locator("#top tbody tr").first.get_attribute("data-project")
                assert first == "spiky", "the spiking project leads the top list"
                page.wait_for_timeout(2500)  # let the sparklines and backlog history fill in
                assert page.locator("#conn").inner_text() == "live"
                assert page.locator('#top tr[data-project="spiky"] svg polyline').count() == 1
                assert page.locator("#s-backlog polyline").count() == 1
                page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
                assert not errors, f"JavaScript errors on the page: {errors}"
            finally:
                browser.close()
    finally:
        stop.set()
        producer.join(30)
    assert sent.get("spiky", 0) > sent.get("iot", 0) * 5
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
