"""The sink's side of the overflow lane: diverted batches out, backpressure in.

A shed project's excess record (``DivertedBatch``, decided by ``PartitionWindows``) is written
as one overflow record (``overflow_record``: the format the drain's ``OverflowChunks`` reads), signed
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

__all__ = ["DIVERTED_HEAD", "MAX_DIVERTING_BYTES", "Diversions", "overflow_record", "read_overflow_record"]

#: A partition's diverted bytes not yet acknowledged by Kafka above which the sink stops taking
#: records until the overflow lane catches up (backpressure from the lane's own producer).
MAX_DIVERTING_BYTES = 32 * 1024 * 1024


#: How a diverted record's overflow value begins (an earlier version's begin ``{"project_id"``).
DIVERTED_HEAD = b'{"diverted":1,'


def overflow_record(source_partition: int, offset: int, timestamp_ms: int, record: bytes) -> bytes:
    """The overflow value of a diverted record: a one-line JSON head saying where it was read
    (the drain's enrichment needs the source partition, offset and timestamp), a newline, then
    the record's value exactly as read (not decoded and encoded again). The project id is the key."""
    head = orjson.dumps(
        {"diverted": 1, "source_partition": source_partition, "offset": offset, "timestamp_ms": timestamp_ms}
    )
    return head + b"\n" + record


def read_overflow_record(value: bytes) -> tuple[int, int, int, bytes]:
    """(source partition, offset, timestamp in ms, the record's value) of ``overflow_record``'s
    output; raises ``ValueError`` for anything else (anyone may produce to the overflow topic)."""
    head, newline, record = value.partition(b"\n")
    if not newline or not head.startswith(DIVERTED_HEAD):
        raise ValueError("not a diverted record")
    doc = orjson.loads(head)  # a JSONDecodeError is a ValueError
    fields = (doc.get("source_partition"), doc.get("offset"), doc.get("timestamp_ms"))
    if not all(type(field) is int for field in fields):
        raise ValueError("source partition, offset and timestamp must be integers")
    source, offset, timestamp_ms = fields
    # Any Kafka timestamp (int64; -1 is "none") is carried as read: the drain stamps like the sink.
    if not (0 <= source < 1 << 31 and 0 <= offset < 1 << 63 and -(1 << 63) <= timestamp_ms < 1 << 63):
        raise ValueError("source partition, offset or timestamp out of range")
    return source, offset, timestamp_ms, record


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
