"""Keen's own JavaScript tracking SDK (npm ``keen-tracking``) in headless Chromium, from a page on
ANOTHER origin, against one real worker: fetch (CORS preflight with ``keen-sdk``), the Beacon API
(``navigator.sendBeacon``: text/plain POST with ``api_key`` in the query), the image beacon (GET
with base64 ``data``) and ``recordEvents`` (batch). Every event reaches S3 exactly once and the SDK
reports success where it reports.

The SDK comes from tests/browser/package-lock.json (``npm ci --prefix tests/browser``, run by
scripts/system-deps.sh); Chromium is Debian's. Either missing is a failure, not a skip.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.api.test_keen_parity import Stack, in_s3, stack  # noqa: F401 - the module's one worker
from tests.helpers import wait_until
from tests.web.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.integration

SDK_DIR = Path(__file__).resolve().parent.parent / "browser" / "node_modules" / "keen-tracking" / "dist"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>shop</title>
<script src="/keen-tracking.min.js"></script></head>
<body><h1>a page on another origin</h1></body></html>
"""

# Runs in the page: one event per send mode, then a batch; resolves with what the SDK reported.
DRIVE_SDK = """
async ({projectId, writeKey, host, run}) => {
  const client = new KeenTracking({projectId, writeKey, host, protocol: 'http', requestType: 'fetch'});
  const out = {origin: window.location.origin};
  // Bounded: a send mode that never reports fails the test instead of hanging it.
  const within = (what, start) => Promise.race([
    new Promise(start),
    new Promise(resolve => setTimeout(() => resolve({ok: false, error: 'no report: ' + what}), 20000))]);
  // The SDK reports through the callback: (null, parsed answer) on success, (error) otherwise.
  const reported = (resolve) => (err, res) => resolve(err ? {ok: false, error: err} : {ok: true, response: res});
  out.fetch = await within('fetch', resolve => client.recordEvent({
    collection: 'sdk_fetch',
    event: {run, mode: 'fetch', ip_address: '${keen.ip}', ua: '${keen.user_agent}',
            keen: {addons: [{name: 'keen:ua_parser', input: {ua_string: 'ua'}, output: 'parsed_user_agent'},
                            {name: 'keen:url_parser', input: {url: 'page'}, output: 'parsed_page'}]},
            page: window.location.href + '?utm_source=test#top'},
    callback: reported(resolve)
  }));
  out.beacon_api = await within('beaconAPI', resolve => client.recordEvent({
    collection: 'sdk_beacon_api', event: {run, mode: 'beaconAPI'}, requestType: 'beaconAPI',
    callback: (err, res) => resolve({called: true, err: err || null})}));
  out.image = await within('image beacon', resolve => client.recordEvent({
    collection: 'sdk_image', event: {run, mode: 'image', text: 'caf\\u00e9 + / ?'}, requestType: 'img',
    callback: (err, res) => resolve({ok: !err, err: err || null})}));
  out.batch = await within('recordEvents', resolve => client.recordEvents({
    sdk_batch: [{run, n: 1}, {run, n: 2}, {run, n: 3}],
    sdk_batch_other: [{run, n: 4}]
  }, reported(resolve)));
  return out;
}
"""

# On an HTTP error the SDK does not call back; its promise is fetch's, whose Response must be
# readable cross-origin (CORS headers on the error answer), else the browser hides the status.
DRIVE_BAD_KEY = """
async ({projectId, host, run}) => new KeenTracking({projectId, writeKey: 'wrong', host, protocol: 'http',
                                                    requestType: 'fetch'})
  .recordEvent({collection: 'sdk_fetch', event: {run, mode: 'bad-key'}})
  .then(r => ({ok: r.ok, status: r.status, type: r.type}), e => ({ok: false, error: String(e)}))
"""


class _PageHandler(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/favicon.ico":
            self.send_response(204)
            self.end_headers()
            return
        if self.path.split("?")[0] in ("/", "/index.html"):
            body = PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def page_origin() -> Iterator[str]:
    """A second HTTP server (another port: another origin) serving the page and the SDK."""
    assert (SDK_DIR / "keen-tracking.min.js").exists(), (
        f"{SDK_DIR} missing: run `npm ci --prefix tests/browser` (scripts/system-deps.sh does)"
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_PageHandler, directory=str(SDK_DIR)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_keen_tracking_sdk_all_send_modes_from_another_origin(stack: Stack, page_origin: str) -> None:  # noqa: F811
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: apt-get install chromium (scripts/system-deps.sh does)"
    from playwright.sync_api import sync_playwright

    run = f"run-{time.time_ns()}"
    host = stack.web.removeprefix("http://")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.goto(f"{page_origin}/")
            user_agent = page.evaluate("navigator.userAgent")
            result = page.evaluate(
                DRIVE_SDK, {"projectId": stack.project, "writeKey": stack.key, "host": host, "run": run}
            )
            page.wait_for_timeout(500)  # let the Beacon API's fire-and-forget request leave the page
            errors_of_good_writes = list(errors)
            bad_key = page.evaluate(DRIVE_BAD_KEY, {"projectId": stack.project, "host": host, "run": run})
        finally:
            browser.close()

    assert result["origin"] != stack.web, "the page runs on another origin than the API"
    assert result["fetch"] == {"ok": True, "response": {"created": True}}, result
    assert result["beacon_api"] == {"called": True, "err": None}, result
    assert result["image"] == {"ok": True, "err": None}, result
    assert result["batch"] == {
        "ok": True,
        "response": {"sdk_batch": [{"success": True}] * 3, "sdk_batch_other": [{"success": True}]},
    }, result
    # An error answer is readable by the SDK (CORS headers on errors), not an opaque network error.
    assert bad_key == {"ok": False, "status": 401, "type": "cors"}, bad_key
    assert errors_of_good_writes == [], f"errors in the page while recording: {errors_of_good_writes}"

    want = {"sdk_fetch": 1, "sdk_beacon_api": 1, "sdk_image": 1, "sdk_batch": 3, "sdk_batch_other": 1}

    def landed() -> Counter[str]:
        return Counter(coll for coll in want for event in in_s3(stack, coll) if event.get("run") == run)

    wait_until(lambda: landed() == Counter(want), 60, what=f"{want} in S3")
    time.sleep(2.5)  # a second copy would be flushed by now (1 s windows)
    assert landed() == Counter(want), "every event exactly once"

    fetched = next(e for e in in_s3(stack, "sdk_fetch") if e.get("run") == run)
    assert fetched["ua"] == user_agent and fetched["ip_address"] == "127.0.0.1"
    assert fetched["parsed_user_agent"]["browser"]["family"] in ("Chrome", "HeadlessChrome", "Chromium")
    assert (
        fetched["parsed_page"]["query_string"] == {"utm_source": "test"} and fetched["parsed_page"]["anchor"] == "top"
    )
    image = next(e for e in in_s3(stack, "sdk_image") if e.get("run") == run)
    assert image["text"] == "caf\u00e9 + / ?"
