"""The overflow lane: a shed project's excess, diverted by the sink and delivered later, paced.

- ``lane``: the sink's dedicated Kafka producer of diversions and its in-flight bound;
- ``chunks``: ``OverflowChunks``, the deterministic state machine
  that cuts one overflow partition into chunks of "delayed" objects (pure, no I/O);
- ``export``: a diverted record's events as the real-time path writes them (pure, no I/O);
- ``pool``: ``ExportPool``, the processes the drain may run ``export`` in (``STREAMAPP_DRAIN_PROCESSES``);
- ``drain``: ``OverflowDrain``, the service that paces and delivers those chunks exactly once,
  and reports the drain's status.

The overflow package sits above ``streamapp.sink``: it writes with the sink's S3 layout,
checkpoints and parking, and reads the records ``streamapp.sink.diversions`` writes. The sink
never imports it: it is handed its ``OverflowLane``.
"""

from streamapp.overflow.chunks import Chunk, DelayedObject, OverflowChunks, SeenOffsets
from streamapp.overflow.drain import OverflowDrain
from streamapp.overflow.lane import InflightBudget, OverflowLane
from streamapp.overflow.pool import ExportPool, export_pool

__all__ = [
    "Chunk",
    "DelayedObject",
    "ExportPool",
    "InflightBudget",
    "OverflowChunks",
    "OverflowDrain",
    "OverflowLane",
    "SeenOffsets",
    "export_pool",
]
