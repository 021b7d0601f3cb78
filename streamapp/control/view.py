"""The replicated control state: projects, operator overrides and shed states, built by applying
the control topic's records in order (pure: no I/O, the same records give the same view)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from streamapp.control.projects import KEY_FIELDS, ProjectSettings, hash_key


class ControlView:
    """The replicated state, built by applying control records in order."""

    def __init__(self) -> None:
        self.projects: dict[str, ProjectSettings] = {}
        self.overrides: dict[str, dict[str, Any]] = {}  # manual shed/unshed by operators
        self.shed_states: dict[str, dict[str, Any]] = {}  # published by the meters
        self.version = 0
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def apply(self, record: dict[str, Any]) -> None:
        kind = record.get("type")
        project_id = record.get("project_id")
        if not isinstance(project_id, str):
            return
        if kind == "project":
            data = {k: v for k, v in record.items() if k in ProjectSettings.__dataclass_fields__}
            legacy_key = record.get("write_key")
            if isinstance(legacy_key, str) and legacy_key and not data.get("key_hash"):
                data["key_hash"] = hash_key(legacy_key)  # a record from before keys were hashed
            self.projects[project_id] = ProjectSettings(**data)
        elif kind == "key":
            project = self.projects.get(project_id)
            if project is None:
                return
            for name in KEY_FIELDS:
                if name in record:
                    setattr(project, name, record[name])
        elif kind == "quota":
            project = self.projects.get(project_id) or ProjectSettings(project_id, s3_streaming=True)
            for name in ("quota_eps", "quota_bps", "burst", "shed_mode"):
                if name in record:
                    setattr(project, name, record[name])
            self.projects[project_id] = project
        elif kind == "override":
            if record.get("action") in ("shed", "unshed"):
                self.overrides[project_id] = record
            else:
                self.overrides.pop(project_id, None)
        elif kind == "shed_state":
            self.shed_states[project_id] = record.get("state") or {}
        else:
            return
        self.version += 1
        for listener in self.listeners:
            listener(record)
