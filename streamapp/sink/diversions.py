"""The sink's side of the overflow lane: diverted batches out, backpressure in.

A shed project's excess (``DivertedBatch``, decided by ``PartitionWindows``) is written as one
overflow record (``overflow_record``: the format the drain's ``OverflowChunks`` reads), signed
like a control record so the drain delivers only what a worker diverted, and produced through
the lane's own producer (``streamapp.overflow.lane.OverflowLane``, passed in). The batch becomes
committable once Kafka acknowledged it. While over ``MAX_DIVERTING_BYTES`` of a partition's
diversions wait for Kafka, the sink takes no more of that partition's records.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson

from streamapp.control import control_headers

if TYPE_CHECKING:
    from streamapp.overflow.lane import OverflowLane

__all__ = ["MAX_DIVERTING_BYTES", "Diversions", "overflow_record"]

#: A partition's diverted bytes not yet acknowledged by Kafka above which the sink stops taking
#: records until the overflow lane catches up (backpressure from the lane's own producer).
MAX_DIVERTING_BYTES = 32 * 1024 * 1024


def overflow_record(
    project_id: str, collection: str, source_partition: int, positions: list[int], lines: list[bytes]
) -> bytes:
    """The overflow record of a diverted batch: ``lines`` are its events as JSON lines.

    They are already encoded: spliced in rather than decoded and encoded again.
    """
    head = orjson.dumps(
        {
            "project_id": project_id,
            "collection": collection,
            "source_partition": source_partition,
            "positions": positions,
        }
    )
    events = b"[" + b",".join(line.rstrip(b"\n") for line in lines) + b"]"
    return head[:-1] + b',"events":' + events + b"}"


class Diversions:
    """Produces diverted batches into the overflow topic and bounds what waits for Kafka."""

    def __init__(self, lane: OverflowLane, topic: str, control_secret: bytes) -> None:
        self.lane = lane
        self.topic = topic  # the overflow topic
        self._control_secret = control_secret
        self.diverting_bytes: dict[int, int] = {}  # partition -> diverted bytes not acknowledged yet
        self._acked = asyncio.Event()

    def started(self, partition: int, nbytes: int) -> None:
        """A diverted record of ``nbytes`` of ``partition`` is on its way (count it at once)."""
        self.diverting_bytes[partition] = self.diverting_bytes.get(partition, 0) + nbytes

    async def wait(self, partition: int) -> None:
        """Backpressure from the overflow lane: while over ``MAX_DIVERTING_BYTES`` of this
        partition's diversions wait for Kafka, take no more records (the lane's own producer is
        behind; Faust's shared producer is never involved)."""
        while self.diverting_bytes.get(partition, 0) > MAX_DIVERTING_BYTES:
            self._acked.clear()
            await self._acked.wait()

    async def produce(self, partition: int, project: str, value: bytes) -> None:
        """Produce one diverted record (counted by ``started``); returns once Kafka acknowledged it."""
        topic = self.topic
        key = project.encode()
        # Signed like a control record: the drain delivers only what a worker diverted.
        headers: Any = control_headers(self._control_secret, topic, partition, key, value)
        try:
            await self.lane.produce(topic, key, value, partition, headers)
        finally:
            left = self.diverting_bytes.get(partition, 0) - len(value)
            if left > 0:
                self.diverting_bytes[partition] = left
            else:
                self.diverting_bytes.pop(partition, None)
            self._acked.set()
