"""What a partition's windows hand to the sink service after each batch.

Objects to upload (``PendingObject``: on-time, late, early objects and manifest parts), a shed
project's records to divert to the overflow lane (``DivertedBatch``), and invalid records to
dead-letter (``InvalidItem``). None is durable until the sink reports it ``done`` to its
``PartitionWindows``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamapp.contract import position
from streamapp.sink.layout import describe_object, gzip_lines
from streamapp.sink.window_state import Snapshot

__all__ = ["DivertedBatch", "InvalidItem", "PendingObject"]


@dataclass(slots=True)
class PendingObject:
    """An object to upload; its events are not durable until ``done``."""

    id: int
    bucket: str
    key: str
    body_lines: bytes | bytearray | None  # JSON lines, gzipped on upload
    body_json: bytes | None  # manifest parts
    events: int
    nbytes: int
    project_id: str
    collection: str
    start: int
    kind: str
    first_pos: int  # also where it holds the commit point until durable
    last_pos: int
    snapshot: Snapshot  # the state to restore from if the commit point stays at ``first_pos``
    flush_at: int

    def body(self) -> bytes:
        if self.body_lines is not None:
            return gzip_lines(self.body_lines)
        assert self.body_json is not None
        return self.body_json

    def describe(self) -> dict[str, Any]:
        return describe_object(self, first_position=self.first_pos, last_position=self.last_pos)


@dataclass(slots=True)
class DivertedBatch:
    """A shed project's record sent whole to the overflow lane (must be acked to commit).

    ``record`` is the source record's value exactly as read: the sink checked its envelope and
    identity but does not enrich or re-encode its events (the drain does, at its own pace), which
    makes a diverted event several times cheaper for the sink than an exported one.
    """

    id: int
    project_id: str
    offset: int  # the source record's offset and timestamp: the drain's enrichment needs them
    timestamp_ms: int
    record: bytes
    events: int
    snapshot: Snapshot  # the state to restore from if the commit point stays at its first position

    @property
    def first_pos(self) -> int:
        return position(self.offset)


@dataclass(slots=True)
class InvalidItem:
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str
