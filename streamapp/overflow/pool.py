"""The drain's process pool: diverted records exported on the cores the worker's loop leaves idle.

The drain's cost is the real-time path's per event (parse, enrich, add-ons, encode: ~35 us with
Keen's ua/url/referrer add-ons), all of it in the worker's one event loop. After a spike that
caps a backlog's catch-up at what one core does (~23,000 events/s on this project's 2-core test
machine, while the second core idled), and during a spike every diverted event it exports takes
loop time from the real-time path it was diverted to protect. ``STREAMAPP_DRAIN_PROCESSES`` > 0
runs ``export.export_many`` (a pure function of the records' bytes) in that many spawned
processes: the loop keeps only the log's decisions (signatures, duplicates, chunk cuts) and the
S3 writes, and a fetched batch is split among the processes.

Nothing here decides what is delivered: a slice that fails for any reason (a process killed, the
pool broken, a record the export raised on) comes back as ``None`` per record, and the drain
exports those records in its own loop, where the outcome is the one it always had. A broken pool
is replaced. The worker starts the pool as it starts; until the processes are up (a spawned
interpreter imports ``streamapp``'s export path, ~1 s) the drain exports in its loop, so the pool
never delays a delivery.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from streamapp.contract import CONTROL_KEY_PREFIX
from streamapp.overflow.export import ExportLimits, RecordLines, export_many
from streamapp.settings import Settings
from streamapp.sink.diversions import DIVERTED_HEAD

log = logging.getLogger(__name__)

#: Replacements of a failing pool before the drain gives up on it (and exports in its loop only):
#: a pool that cannot run here would otherwise respawn its processes at every batch.
MAX_RESTARTS = 10

#: A record the processes export at start-up: every add-on's parser is loaded (ua-parser compiles
#: its regexes on first use) before the pool takes real work.
_WARM_UP_RECORD = (
    b'{"diverted":1,"source_partition":0,"offset":0,"timestamp_ms":1700000000000}\n'
    b'{"project_id":"warm","collection":"c","event":{"ua":"Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0",'
    b'"u":"https://example.com/a?b=c","keen":{"addons":['
    b'{"name":"keen:ua_parser","input":{"ua_string":"ua"},"output":"o1"},'
    b'{"name":"keen:url_parser","input":{"url":"u"},"output":"o2"},'
    b'{"name":"keen:referrer_parser","input":{"referrer_url":"u","page_url":"u"},"output":"o3"}]}}}'
)


def _exit_with_parent() -> None:
    """Each process's initializer: exit when the worker does, however it ends. A killed worker
    leaves its pool's queues open (the processes hold both ends), so they would wait forever."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(0)), name="exit-with-parent", daemon=True).start()


def _warm_up(limits: ExportLimits) -> bool:
    """Run in each process once: True when the export path works there."""
    lines = export_many([(b"warm", _WARM_UP_RECORD)], limits)[0]
    return lines is not None and lines.refused is None and not lines.dead


def export_pool(settings: Settings) -> ExportPool | None:
    """The drain's pool as ``settings`` ask (``drain_processes``), not started; None for none."""
    if settings.drain_processes <= 0:
        return None
    limits = ExportLimits(
        settings.window_seconds, settings.max_record_bytes, settings.max_event_bytes, settings.max_future_seconds
    )
    return ExportPool(settings.drain_processes, limits)


class ExportPool:
    """``processes`` spawned processes exporting slices of fetched batches; see the module doc."""

    def __init__(self, processes: int, limits: ExportLimits) -> None:
        self.processes = processes
        self.limits = limits
        self.executor: ProcessPoolExecutor | None = None
        self._warming: list[Future[bool]] = []
        self.started = False
        self.exported = 0  # records exported by the processes
        self.fallbacks = 0  # records handed back to the loop (a failed slice, or a record that raised)
        self.restarts = 0

    def start(self) -> None:
        """Start the processes (in the background: ``usable`` says when they are up)."""
        self.started = True
        # spawn, not fork: the worker's loop, threads and sockets must not be copied into a child.
        context = multiprocessing.get_context("spawn")
        try:
            executor = ProcessPoolExecutor(self.processes, mp_context=context, initializer=_exit_with_parent)
            self._warming = [executor.submit(_warm_up, self.limits) for _ in range(self.processes)]
        except Exception as exc:  # noqa: BLE001 - no process to be had (limits, memory): the loop exports
            log.error(
                "drain: the export pool did not start (%s: %.200s); the drain exports in its loop",
                type(exc).__name__,
                exc,
            )
            self._warming = []
            return
        self.executor = executor

    def usable(self) -> bool:
        """Every process up and warmed, and not broken since (a failed warm-up replaces it). The
        worker starts the pool as it starts; the first call starts it otherwise."""
        if not self.started:
            self.start()
        if self.executor is None or not self._warming:
            return False
        if not all(future.done() for future in self._warming):
            return False
        if not all(future.exception() is None and future.result() for future in self._warming):
            self._replace("its warm-up failed")
            return False
        return True

    def lines_for(self, records: list[Any], from_offset: int) -> asyncio.Future[dict[int, RecordLines]]:
        """``diverted_lines``, started now: the drain starts the next batch's before it applies one."""
        return asyncio.ensure_future(self.diverted_lines(records, from_offset))

    async def diverted_lines(self, records: list[Any], from_offset: int) -> dict[int, RecordLines]:
        """The lines of the diverted records among ``records`` (signed overflow records, Kafka
        ``ConsumerRecord``s) at ``from_offset`` or after, by offset; empty while the pool starts.
        Never raises: whatever the pool does, the drain can export in its loop."""
        try:
            return await self._diverted_lines(records, from_offset)
        except Exception as exc:  # noqa: BLE001 - the pool only ever saves the loop work
            log.warning("drain: export pool: %s: %.200s; the drain exports in its loop", type(exc).__name__, exc)
            return {}

    async def _diverted_lines(self, records: list[Any], from_offset: int) -> dict[int, RecordLines]:
        if not self.usable():
            return {}
        diverted = [
            record
            for record in records
            if record.offset >= from_offset
            and record.value is not None
            and record.value.startswith(DIVERTED_HEAD)
            and (record.key or b"")[:1] != CONTROL_KEY_PREFIX
        ]
        if not diverted:
            return {}
        lines = await self.export([(record.key, record.value) for record in diverted])
        return {record.offset: found for record, found in zip(diverted, lines, strict=True) if found is not None}

    async def export(self, records: list[tuple[bytes | None, bytes]]) -> list[RecordLines | None]:
        """``export_many`` of ``records``, split among the processes; None for each record of a
        slice that failed (the caller exports those itself)."""
        executor = self.executor
        if executor is None or not records:
            return [None] * len(records)
        size = -(-len(records) // self.processes)
        slices = [records[i : i + size] for i in range(0, len(records), size)]
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(executor, export_many, part, self.limits) for part in slices]
        results = await asyncio.gather(*futures, return_exceptions=True)
        out: list[RecordLines | None] = []
        failed = None
        for part, result in zip(slices, results, strict=True):
            if isinstance(result, BaseException):
                failed = result
                out.extend([None] * len(part))
            else:
                out.extend(result)
        handed_back = sum(1 for lines in out if lines is None)
        self.fallbacks += handed_back
        self.exported += len(out) - handed_back
        if failed is not None and executor is self.executor:
            self._replace(f"{type(failed).__name__}: {failed}")
        return out

    def _replace(self, why: str) -> None:
        self.close()
        if self.restarts >= MAX_RESTARTS:
            log.error("drain: export pool failed (%.200s) %s times; the drain exports in its loop", why, self.restarts)
            return
        log.warning("drain: export pool failed (%.200s); restarting it, the drain exports in its loop meanwhile", why)
        self.restarts += 1
        self.start()

    def close(self) -> None:
        executor, self.executor, self._warming = self.executor, None, []
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def status(self) -> dict[str, int | bool]:
        return {
            "processes": self.processes,
            "ready": self.executor is not None and all(f.done() and f.exception() is None for f in self._warming),
            "exported_records": self.exported,
            "fallback_records": self.fallbacks,
            "restarts": self.restarts,
        }
