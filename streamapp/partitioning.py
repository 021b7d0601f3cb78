"""Kafka's default partitioner for a project id key, written once.

Every producer of the events topic (the HTTP API, the SDKs, ``kafka-console-producer``) keys a
record by its project id and lets the default partitioner (murmur2) choose the partition. The
meter (which partition's tables hold a project) and the views (which worker to ask about a
project) must pick the same one; both use this function.
"""

from __future__ import annotations

from aiokafka.partitioner import murmur2

__all__ = ["key_partition"]


def key_partition(project_id: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2) picks for a project id key."""
    return (murmur2(project_id.encode()) & 0x7FFFFFFF) % partitions
