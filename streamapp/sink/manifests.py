"""Window manifests: a window is complete when every events partition wrote its manifest part.

Each partition's ``PartitionWindows`` writes one manifest part per window it closes (durable
before its commit point moves past the close). The sink service asks here, after each commit
round, for the windows whose parts it wrote; when every partition's part is in S3 the window's
manifest (all objects, events and bytes of the window) is written, once per worker that sees it
complete, always with the same bytes.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from streamapp.sink.layout import manifest_key, manifest_parts_prefix
from streamapp.sink.s3 import S3Writer

log = logging.getLogger(__name__)

__all__ = ["ManifestComposer", "parse_manifest_part"]


class ManifestComposer:
    """Writes the manifest of each window in ``pending`` once all its parts are in S3."""

    def __init__(self, s3: S3Writer, bucket: str, prefix: str, topic: str, partitions: int) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix
        self.topic = topic
        self.partitions = partitions
        self.pending: set[int] = set()  # window starts whose part this worker wrote

    async def compose(self) -> None:
        """A window is complete when every partition wrote its part: then write the manifest."""
        bucket, prefix = self.bucket, self.prefix
        for start in sorted(self.pending):
            parts_prefix = manifest_parts_prefix(prefix, start)
            # Only the parts this service writes count: any other object under the prefix is ignored.
            expected = {f"{parts_prefix}{self.topic}-{partition}.json" for partition in range(self.partitions)}
            keys = [key for key in await self.s3.list_keys(bucket, parts_prefix) if key in expected]
            if len(keys) < len(expected):
                continue
            self.pending.discard(start)
            parts = []
            for key in sorted(keys):
                body = await self.s3.get(bucket, key)
                part = parse_manifest_part(key, body)
                if part is not None:
                    parts.append(part)
            objects = sorted((o for p in parts for o in p["objects"]), key=lambda o: o["key"])
            manifest = {
                "window_start": start,
                "complete": True,
                "partitions": len(parts),
                "objects": objects,
                "events": sum(o["events"] for o in objects),
                "bytes": sum(o["bytes"] for o in objects),
            }
            body = orjson.dumps(manifest, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
            await self.s3.put(bucket, manifest_key(prefix, start), lambda body=body: body, "application/json")


def parse_manifest_part(key: str, body: bytes | None) -> dict[str, Any] | None:
    """A manifest part as the sink writes it, or None (logged) when the object is not one."""
    if body is None:
        return None
    try:
        part = orjson.loads(body)
    except orjson.JSONDecodeError:
        part = None
    objects = part.get("objects") if type(part) is dict else None
    if type(objects) is not list or not all(
        type(o) is dict and type(o.get("key")) is str and type(o.get("events")) is int and type(o.get("bytes")) is int
        for o in objects
    ):
        log.warning("sink: ignoring %s: not a manifest part", key)
        return None
    return part
