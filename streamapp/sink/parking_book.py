"""The bookkeeping of parked destinations, pure (times are passed in): what is parked, why, since
when, and when to try again; and the keys parked objects are stored under.

The service that parks and redelivers (``Parking``) is streamapp.sink.parking, which explains
the whole mechanism.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from streamapp.sink.s3_errors import ErrorKind

__all__ = [
    "PARKED_DIR",
    "ParkedObject",
    "ParkingBook",
    "TenantParking",
    "parked_key",
    "parked_root",
    "parse_parked_key",
]

PARKED_DIR = "_parked"


# ---------------------------------------------------------------------------------------- keys
def parked_root(prefix: str, app_id: str, topic: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{PARKED_DIR}/{app_id}/{topic}/" if prefix else f"{PARKED_DIR}/{app_id}/{topic}/"


def parked_key(root: str, partition: int, project_id: str, bucket: str, key: str) -> str:
    """Where an object of ``partition`` bound for ``bucket``/``key`` waits (project ids and buckets have no '/')."""
    return f"{root}{partition}/{project_id}/{bucket}/{key}"


@dataclass(frozen=True, slots=True)
class ParkedObject:
    parked_key: str
    topic: str  # the lane that wrote it (events or overflow) and its partition
    partition: int
    project_id: str
    bucket: str  # the original destination
    key: str
    size: int  # bytes as stored (gzip)


def parse_parked_key(root: str, topic: str, parked: str, size: int = 0) -> ParkedObject | None:
    """The parked object a key of the quarantine (under ``root``, the lane ``topic``'s) stands for; else None."""
    if not parked.startswith(root):
        return None
    parts = parked[len(root) :].split("/", 3)
    if len(parts) != 4 or not parts[0].isdigit() or not all(parts):
        return None
    partition, project_id, bucket, key = parts
    return ParkedObject(parked, topic, int(partition), project_id, bucket, key, size)


# ---------------------------------------------------------------------------------- bookkeeping
@dataclass(frozen=True)
class ParkedOrigin:
    """Why and when a project's oldest parked object was parked (stored with the object)."""

    reason: str = "parked before this worker took the partition"
    since: float | None = None


@dataclass
class TenantParking:
    """One parked project: its objects waiting in the quarantine and the state of redelivery."""

    project_id: str
    reason: str
    since: float
    next_attempt_at: float
    objects: dict[str, ParkedObject] = field(default_factory=dict)
    attempts: int = 0
    last_attempt_at: float | None = None
    last_error: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "project_id": self.project_id,
            "parked": True,
            "reason": self.reason,
            "since": self.since,
            "buckets": sorted({o.bucket for o in self.objects.values()}),
            "backlog_objects": len(self.objects),
            "backlog_bytes": sum(o.size for o in self.objects.values()),
            "redelivery_attempts": self.attempts,
            "last_attempt_at": self.last_attempt_at,
            "next_attempt_at": self.next_attempt_at,
            "last_error": self.last_error,
        }


class ParkingBook:
    """What is parked on this worker, per project, and when to try redelivering it (no I/O, no clock)."""

    def __init__(self, retry_seconds: float) -> None:
        self.retry_seconds = retry_seconds
        self.tenants: dict[str, TenantParking] = {}
        self.objects_parked = 0  # counters since start (metrics)
        self.objects_redelivered = 0

    def is_parked(self, project_id: str) -> bool:
        return project_id in self.tenants

    def parked(self, obj: ParkedObject, reason: str, now: float) -> None:
        """``obj`` is in the quarantine because of ``reason``; a new tenant is retried after ``retry_seconds``."""
        tenant = self.tenants.get(obj.project_id)
        if tenant is None:
            tenant = self.tenants[obj.project_id] = TenantParking(
                obj.project_id, reason, now, next_attempt_at=now + self.retry_seconds
            )
        if obj.parked_key not in tenant.objects:
            self.objects_parked += 1
        tenant.objects[obj.parked_key] = obj

    def unknown_projects(self, objects: Iterable[ParkedObject]) -> dict[str, str]:
        """Projects among ``objects`` this book does not know yet, each with its oldest parked key.

        The caller reads the reason stored with that key before calling :meth:`discovered`, so a
        project never shows up without it.
        """
        oldest: dict[str, str] = {}
        for obj in objects:
            if obj.project_id not in self.tenants:
                known = oldest.get(obj.project_id)
                oldest[obj.project_id] = obj.parked_key if known is None else min(known, obj.parked_key)
        return oldest

    def discovered(self, objects: Iterable[ParkedObject], now: float, origins: Mapping[str, ParkedOrigin]) -> None:
        """Parked objects found by listing the quarantine (after a restart or a rebalance).

        Projects not known yet take their reason and time from ``origins`` (what their oldest
        object was parked with, see :meth:`unknown_projects`) and are due at once: their objects
        may have waited for a long time.
        """
        for obj in objects:
            tenant = self.tenants.get(obj.project_id)
            if tenant is None:
                origin = origins.get(obj.project_id, ParkedOrigin())
                since = now if origin.since is None else min(now, origin.since)
                tenant = self.tenants[obj.project_id] = TenantParking(
                    obj.project_id, origin.reason, since, next_attempt_at=now
                )
            tenant.objects.setdefault(obj.parked_key, obj)

    def redelivered(self, obj: ParkedObject) -> bool:
        """``obj`` is in its original place and no longer parked; True when its tenant has nothing left."""
        tenant = self.tenants.get(obj.project_id)
        if tenant is None or tenant.objects.pop(obj.parked_key, None) is None:
            return False
        self.objects_redelivered += 1
        if not tenant.objects:
            del self.tenants[obj.project_id]
            return True
        return False

    def attempt_started(self, project_id: str, now: float) -> list[ParkedObject]:
        """Begin a redelivery attempt: the project's objects, oldest key first."""
        tenant = self.tenants.get(project_id)
        if tenant is None:
            return []
        tenant.attempts += 1
        tenant.last_attempt_at = now
        tenant.next_attempt_at = now + self.retry_seconds
        return sorted(tenant.objects.values(), key=lambda o: o.parked_key)

    def attempt_failed(self, project_id: str, kind: ErrorKind, reason: str, now: float) -> None:
        """The attempt stopped on an error; a tenant error is the new reason, a transient one only noted."""
        tenant = self.tenants.get(project_id)
        if tenant is None:
            return
        tenant.last_error = reason
        if kind is ErrorKind.TENANT:
            tenant.reason = reason
        tenant.next_attempt_at = now + self.retry_seconds

    def retry_now(self, project_id: str | None = None) -> list[str]:
        """Make one project (or all) due now; returns the projects concerned."""
        ids = [project_id] if project_id is not None else list(self.tenants)
        out = []
        for pid in ids:
            tenant = self.tenants.get(pid)
            if tenant is not None:
                tenant.next_attempt_at = float("-inf")
                out.append(pid)
        return out

    def due(self, now: float) -> list[str]:
        return sorted(pid for pid, t in self.tenants.items() if t.next_attempt_at <= now)

    def forget_partitions(self, keep: set[tuple[str, int]]) -> None:
        """Drop objects of (topic, partition)s this worker no longer owns (their new owner lists them)."""
        for pid in list(self.tenants):
            tenant = self.tenants[pid]
            tenant.objects = {k: o for k, o in tenant.objects.items() if (o.topic, o.partition) in keep}
            if not tenant.objects:
                del self.tenants[pid]

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {pid: t.describe() for pid, t in sorted(self.tenants.items())}

    def totals(self) -> tuple[int, int]:
        """(objects, bytes) parked on this worker."""
        objects = sum(len(t.objects) for t in self.tenants.values())
        nbytes = sum(o.size for t in self.tenants.values() for o in t.objects.values())
        return objects, nbytes
