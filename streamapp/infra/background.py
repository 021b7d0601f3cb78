"""Fire-and-forget work of a worker (object notices, dead letters, parked-object notices).

Each service that sends something it does not wait for hands it to one ``BackgroundTasks``:
the task is referenced until it ends (asyncio keeps only weak references), and a failure is
counted and logged instead of vanishing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

log = logging.getLogger(__name__)


class BackgroundTasks:
    def __init__(self) -> None:
        self._running: set[asyncio.Future[Any]] = set()
        self.failures = 0

    def spawn(self, awaitable: Awaitable[Any]) -> asyncio.Future[Any]:
        """Run in the background, keeping a reference and logging failures; the future, for a
        caller that also waits for it (the overflow drain's deliveries)."""
        future = asyncio.ensure_future(awaitable)
        self._running.add(future)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, future: asyncio.Future[Any]) -> None:
        self._running.discard(future)
        if not future.cancelled() and future.exception() is not None:
            # Bounded: at shutdown every notice still queued fails the same way (the producer has
            # stopped), and 50,000 of them must not become 50,000 log lines.
            self.failures += 1
            if self.failures <= 10 or self.failures % 1000 == 0:
                log.warning("background task failed (%d so far): %r", self.failures, future.exception())
