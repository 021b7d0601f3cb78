"""Window math and the S3 key layout (Keen's S3 streaming layout, made deterministic)."""

from __future__ import annotations

import gzip
import time
from typing import Any, Protocol

from streamapp.contract import INDEX_BITS

KIND_ON_TIME = "on_time"
KIND_LATE = "late"
KIND_EARLY = "early"  # events stamped ahead of their record: flushed with the late ones, not held open
KIND_EARLY_LATER = "early_later"  # events stamped further ahead, grouped (sink.partition.LATE_WINDOWS)
KIND_LATE_OLDER = "late_older"  # late events of long-closed windows, grouped (sink.partition.LATE_WINDOWS)
KIND_DELAYED = "delayed"
KIND_MANIFEST_PART = "manifest_part"

#: Where a project's objects go: (bucket, prefix). The real-time sink, the overflow drain and the
#: control plane's ``export_target`` all speak of it.
Target = tuple[str, str]


def window_start(event_time: float, size: int) -> int:
    """Start (epoch seconds) of the tumbling window holding ``event_time``."""
    return int(event_time // size) * size


def window_iso(start: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(start))


def object_suffix(kind: str, lane_partition: int, first_pos: int) -> str:
    """Only Kafka coordinates: a replay writes the same key."""
    offset, index = first_pos >> INDEX_BITS, first_pos & ((1 << INDEX_BITS) - 1)
    lane = "d" if kind == KIND_DELAYED else "p"
    suffix = f"{lane}{lane_partition}-o{offset}" + (f"-i{index}" if index else "")
    if kind == KIND_LATE:
        suffix += "-late"
    elif kind == KIND_LATE_OLDER:
        suffix += "-late-older"
    elif kind == KIND_EARLY:
        suffix += "-early"
    elif kind == KIND_EARLY_LATER:
        suffix += "-early-later"
    elif kind == KIND_DELAYED:
        suffix += "-delayed"
    return suffix


def object_key(
    prefix: str, project_id: str, collection: str, start: int, kind: str, lane_partition: int, first_pos: int
) -> str:
    """``{prefix}/{project}/{window}/{collection}/{project}-{collection}-{window}-{suffix}.json.gz``."""
    ws = window_iso(start)
    name = f"{project_id}-{collection}-{ws}-{object_suffix(kind, lane_partition, first_pos)}.json.gz"
    return f"{_join(prefix, project_id)}/{ws}/{collection}/{name}"


def manifest_part_key(prefix: str, start: int, topic: str, partition: int) -> str:
    return f"{_join(prefix, '_manifests')}/{window_iso(start)}/parts/{topic}-{partition}.json"


def manifest_parts_prefix(prefix: str, start: int) -> str:
    return f"{_join(prefix, '_manifests')}/{window_iso(start)}/parts/"


def manifest_key(prefix: str, start: int) -> str:
    return f"{_join(prefix, '_manifests')}/{window_iso(start)}.json"


def checkpoint_key(prefix: str, app_id: str, topic: str, partition: int, offset: int) -> str:
    return f"{_join(prefix, '_checkpoints')}/{app_id}/{topic}/{partition}/{offset:020d}.json"


def gzip_lines(data: bytes | bytearray) -> bytes:
    """Deterministic gzip (mtime 0) of JSON lines: a replay uploads identical bytes."""
    return gzip.compress(data, compresslevel=5, mtime=0)


def _join(prefix: str, part: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{part}" if prefix else part


class WrittenObject(Protocol):
    bucket: str
    key: str
    events: int
    nbytes: int
    project_id: str
    collection: str
    kind: str


def describe_object(obj: WrittenObject, **extra: Any) -> dict[str, Any]:
    """An object's entry in manifests, checkpoints and "object written" notices."""
    return {
        "bucket": obj.bucket,
        "key": obj.key,
        "events": obj.events,
        "bytes": obj.nbytes,
        "project_id": obj.project_id,
        "collection": obj.collection,
        "kind": obj.kind,
        **extra,
    }
