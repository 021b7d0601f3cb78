"""The records of the control topic, built in one place so the CLI (``streamapp project|quota|shed|
unshed``) and the admin HTTP API publish the very same records; every worker applies them to its
:class:`~streamapp.control.view.ControlView`. No I/O; ``key`` and ``override`` records are
stamped with the wall clock (``at``)."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from streamapp.control.projects import ProjectSettings
from streamapp.metering import SHED_MODES  # the one shed vocabulary


def project_record(project: ProjectSettings) -> dict[str, Any]:
    return {"type": "project", **asdict(project)}


def key_record(
    project_id: str, key_hash: str, previous_key_hash: str = "", previous_key_expires_at: float | None = None
) -> dict[str, Any]:
    """A ``key`` record: replaces only the key fields of a project (rotation; an empty ``key_hash``
    is a revocation)."""
    now = time.time()
    return {
        "type": "key",
        "project_id": project_id,
        "key_hash": key_hash,
        "previous_key_hash": previous_key_hash,
        "previous_key_expires_at": previous_key_expires_at,
        "key_revoked_at": None if key_hash else now,
        "at": now,
    }


def quota_record(
    project_id: str,
    *,
    quota_eps: float | None = None,
    quota_bps: float | None = None,
    burst: float | None = None,
    shed_mode: str | None = None,
    reset: bool = False,
) -> dict[str, Any]:
    """A ``quota`` record: only the given fields change; ``reset`` puts all four back to the defaults."""
    if shed_mode is not None and shed_mode not in SHED_MODES:
        raise ValueError(f"shed mode must be one of {SHED_MODES}, got {shed_mode!r}")
    for name, value in (("quota_eps", quota_eps), ("quota_bps", quota_bps)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if burst is not None and not burst >= 0:
        raise ValueError(f"burst must be >= 0, got {burst}")
    record: dict[str, Any] = {"type": "quota", "project_id": project_id}
    if reset:
        record.update(quota_eps=None, quota_bps=None, burst=None, shed_mode=None)
    for name, value in (("quota_eps", quota_eps), ("quota_bps", quota_bps), ("burst", burst), ("shed_mode", shed_mode)):
        if value is not None:
            record[name] = value
    return record


def override_record(project_id: str, action: str, reason: str = "", mode: str | None = None) -> dict[str, Any]:
    """Manual ``shed``/``unshed`` (wins over the rates until ``clear``)."""
    if action not in ("shed", "unshed", "clear"):
        raise ValueError(f"action must be shed, unshed or clear, got {action!r}")
    if mode is not None and mode not in SHED_MODES:
        raise ValueError(f"shed mode must be one of {SHED_MODES}, got {mode!r}")
    record: dict[str, Any] = {"type": "override", "project_id": project_id, "action": action, "reason": reason}
    if mode is not None:
        record["mode"] = mode
    record["at"] = time.time()
    return record
