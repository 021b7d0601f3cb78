"""The real-time S3 sink: the events topic into event-time tumbling windows in S3, exactly once.

- ``partition``: ``PartitionWindows``, one partition's windows as a pure state machine, with its
  data (``window_state``) and what it hands out (``outputs``);
- ``layout``: the S3 key layout (Keen's) and window math; ``Target`` = (bucket, prefix);
- ``service``: ``S3Sink``, which feeds records to the windows and carries out what comes out;
  beside it ``checkpoints``, ``manifests``, ``diversions`` (the sink's side of the overflow
  lane), ``status`` and ``uploads`` (fair order);
- ``event_lines``: one event as the line it is exported as (the drain's copy of the real-time
  rules, for the records the sink diverted whole);
- ``s3``, ``s3_errors``, ``parking``: writing to S3, and parking a tenant's objects while its own
  bucket fails (used by the overflow drain too).
"""

from streamapp.sink.checkpoints import CheckpointStore
from streamapp.sink.diversions import DIVERTED_HEAD, overflow_record, read_overflow_record
from streamapp.sink.event_lines import EventRefused, export_line
from streamapp.sink.layout import KIND_DELAYED, Target, describe_object, gzip_lines, object_key, window_start
from streamapp.sink.outputs import DivertedBatch, InvalidItem, PendingObject
from streamapp.sink.parking import Delivery, Parking
from streamapp.sink.parking_book import ParkingBook
from streamapp.sink.partition import PartitionWindows
from streamapp.sink.s3 import S3Stats, S3Writer
from streamapp.sink.service import S3Sink
from streamapp.sink.status import PartitionStatus
from streamapp.sink.window_state import Route, RouteCounts

__all__ = [
    "DIVERTED_HEAD",
    "KIND_DELAYED",
    "CheckpointStore",
    "Delivery",
    "DivertedBatch",
    "EventRefused",
    "InvalidItem",
    "Parking",
    "ParkingBook",
    "PartitionStatus",
    "PartitionWindows",
    "PendingObject",
    "Route",
    "RouteCounts",
    "S3Sink",
    "S3Stats",
    "S3Writer",
    "Target",
    "describe_object",
    "export_line",
    "gzip_lines",
    "object_key",
    "overflow_record",
    "read_overflow_record",
    "window_start",
]
