"""The worker's web server: Faust's aiohttp driver with aiohttp's request-body decompression off.

aiohttp inflates a gzip or deflate body inside the connection's ``data_received``; when a read
resumes the paused connection it inflates on until the reader's buffer is full again, so a single
read of a small gzip bomb inflated megabytes in one event-loop step (25-44 ms for 10 MiB here), and
every other request on the worker waited behind it. The bodies that accept a Content-Encoding are
inflated by :func:`streamapp.api.body.inflate` instead, in bounded steps. Registered as the
``streamapp://`` web driver (``create_app`` sets ``web="streamapp://"``).
"""

from __future__ import annotations

from typing import Any

from aiohttp.web import AppRunner
from faust.types import AppT
from faust.web.drivers import DRIVERS
from faust.web.drivers.aiohttp import Web

DRIVERS.aliases.setdefault("streamapp", "streamapp.infra.web_server:StreamappWeb")


class StreamappWeb(Web):
    """Faust's aiohttp web driver whose server hands request bodies over as they came on the wire."""

    def __init__(self, app: AppT, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        # The same runner as Faust's (not started yet), with auto_decompress off.
        self._runner = AppRunner(self.web_app, access_log=None, auto_decompress=False)
