"""Carrying out the meter's decisions: shed markers into the events topic, then (once Kafka has
them) the shed-state rows; shed states to the control topic, in decision order.

Decisions queue into an ``Outbox``; ``run_flusher`` (a background task) writes it, so the meter
agent never waits for Kafka acks. ``MeterPublishing`` is one part of
``streamapp.metering.service.Meter``, which holds the state.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from streamapp.contract import SHED_KEY
from streamapp.control import control_headers
from streamapp.tables.meter import StateRow, encode_state, write_rows

from .project_meter import ProjectMeter
from .vocabulary import NOT_SHED

if TYPE_CHECKING:
    import faust

    from streamapp.control import ControlPlane
    from streamapp.tables.meter import MeterTables, PartitionContext

log = logging.getLogger("streamapp.meter")  # the name before the split: log filters keep working
UNKNOWN_MARKER = ("?", -1.0)  # the marker in force is unknown (a send failed): state it again


@dataclass
class Outbox:
    """What decisions produced, carried out by ``MeterPublishing.flush``."""

    markers: list[tuple[ProjectMeter, tuple[str, float] | None]] = field(default_factory=list)
    rows: dict[str, ProjectMeter] = field(default_factory=dict)  # shed-state rows to write
    published: list[dict[str, Any]] = field(default_factory=list)


class MeterPublishing:
    """The outbox and its writers of the ``Meter`` (its state: see ``Meter.__init__``)."""

    app: faust.App
    control: ControlPlane
    tables: MeterTables
    context: PartitionContext
    topic: str
    projects: dict[str, ProjectMeter]
    markers_written: int
    _control_secret: bytes
    _out: Outbox
    _publish_queue: asyncio.Queue[dict[str, Any]] | None
    _flush_wanted: asyncio.Event

    def _wake_flusher(self) -> None:
        if self._out.markers or self._out.rows or self._out.published:
            self._flush_wanted.set()

    async def run_flusher(self) -> None:
        """Carry out decisions in the background, in decision order: the agent never waits for
        Kafka acks (it would stop pulling records meanwhile)."""
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted.clear()
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - what failed is decided and announced again
                log.exception("meter: flush failed")

    async def flush(self) -> None:
        """Write the shed markers decided, then (once Kafka has them) the shed-state rows.

        In this order a crash can lose a row but never a marker the row claims was written:
        the next decision after a restart finds the old row and announces the route again.
        """
        out, self._out = self._out, Outbox()
        producer = self.app.producer
        sent: list[tuple[ProjectMeter, Any]] = []
        failed: set[str] = set()
        for pm, route in out.markers:
            if route is None:
                body = {"project_id": pm.project_id, "mode": NOT_SHED}
            else:
                body = {"project_id": pm.project_id, "mode": route[0], "fraction": route[1]}
            value = orjson.dumps(body)
            headers = control_headers(self._control_secret, self.topic, pm.partition, SHED_KEY, value)
            try:
                fut = await producer.send(self.topic, SHED_KEY, value, pm.partition, None, headers)
            except Exception as exc:  # noqa: BLE001 - announced again on the next decision
                log.warning("shed marker for %s not sent: %r", pm.project_id, exc)
                failed.add(pm.project_id)
                continue
            sent.append((pm, fut))
            log.info("shed marker %s partition %s: %s", pm.project_id, pm.partition, body)
        if sent:
            results = await asyncio.gather(*(fut for _, fut in sent), return_exceptions=True)
            for (pm, _), result in zip(sent, results, strict=True):
                if isinstance(result, BaseException):
                    log.warning("shed marker for %s failed: %r", pm.project_id, result)
                    failed.add(pm.project_id)
                else:
                    self.markers_written += 1
        for project_id in failed:
            pm = self.projects.get(project_id)
            if pm is not None:
                pm.marker = UNKNOWN_MARKER
                self._watch(pm)
        rows = [
            (pm.partition, pm.key, encode_state(StateRow(pm.partition, pm.state, pm.marker, pm.peak_eps)))
            for project_id, pm in out.rows.items()
            if project_id not in failed and self.projects.get(project_id) is pm
        ]
        if rows:
            write_rows(self.tables.states, self.context, rows)
        if out.published:
            queue = self._queue()
            for record in out.published:
                queue.put_nowait(record)

    def _queue(self) -> asyncio.Queue[dict[str, Any]]:
        if self._publish_queue is None:
            self._publish_queue = asyncio.Queue()
        return self._publish_queue

    async def run_publisher(self) -> None:
        """Publish shed states to the control topic, in decision order."""
        queue = self._queue()
        while True:
            record = await queue.get()
            delay = 0.2
            while True:
                try:
                    await self.control.publish(record)
                    break
                except AssertionError:  # control plane not started yet
                    await asyncio.sleep(0.2)
                except Exception as exc:  # noqa: BLE001 - Kafka hiccup: keep order, retry
                    log.warning("publishing shed state failed (%r); retrying", exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
