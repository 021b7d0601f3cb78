"""The admin API's operations: projects, write keys, quotas and manual shed overrides
(``Authorization: Bearer $STREAMAPP_ADMIN_TOKEN``).

* ``POST /admin/projects`` ``{"project_id", "s3_streaming"?, "quota_eps"?, ...}``
  -> 201 ``{"project_id", "write_key", ...}``: the only time the key is shown (only its SHA-256
  goes to the control topic)
* ``GET /admin/projects`` -> ``{"projects": [...]}``; ``GET /admin/projects/{id}`` (never a key
  nor its hash: ``has_key`` and the rotation grace end only)
* ``POST /admin/projects/{id}/key`` ``{"grace_seconds"?}`` -> ``{"write_key", ...}``: rotate; the
  old key stays valid for the grace period (default ``DEFAULT_GRACE_SECONDS``, 0 = at once)
* ``DELETE /admin/projects/{id}/key``: revoke; no key is valid until the next rotation
* ``PUT /admin/projects/{id}/quota`` ``{"quota_eps"?, "quota_bps"?, "burst"?, "shed_mode"?}`` (null = default)
* ``POST /admin/projects/{id}/shed`` ``{"reason", "mode"?}``: manual shed override
* ``DELETE /admin/projects/{id}/shed`` ``{"reason"}``: manual unshed override
  (``?clear=true`` removes the override instead: automatic shedding again)
* ``POST /admin/sink/retry-parked`` ``{"project_id"?}``: redeliver parked objects now (one project
  or all; see ``streamapp.sink.parking``). Parked objects live with their partition's owner, so
  the call goes to every worker of the group (``?local=1``: this worker only).

Every change is a record on the control topic (:mod:`streamapp.control`), so it reaches every
worker; the answer comes once this worker's own view shows the change (at most ``VIEW_WAIT_SECONDS``),
so a write right after ``POST /admin/projects`` succeeds on this worker.
An empty ``STREAMAPP_ADMIN_TOKEN`` disables the admin API (403); the token check itself is
:func:`streamapp.web.auth.admin_token_check`. The routes: :mod:`streamapp.control.views`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from streamapp.api import INVALID_JSON, NOT_FOUND, REQUEST_TIMEOUT, TOO_LARGE, ApiError, parse_object, unavailable
from streamapp.api.body import IDENTITY_ENCODINGS, body_encoding, inflate
from streamapp.contract import is_valid_name, name_rule, preview
from streamapp.control.plane import ControlPlane
from streamapp.control.projects import SECRET_KEY_FIELDS, ProjectSettings, hash_key, new_write_key
from streamapp.control.records import key_record, override_record, project_record, quota_record
from streamapp.metering.shed import MODES
from streamapp.settings import Settings
from streamapp.web.auth import AdminAccess, admin_token_check

VIEW_WAIT_SECONDS = 2.0
CONTROL_START_WAIT_SECONDS = 30.0
PUBLISH_TIMEOUT_SECONDS = 5.0
MAX_ADMIN_BODY = 64 * 1024
BODY_TIMEOUT_SECONDS = 10.0
QUOTA_FIELDS = ("quota_eps", "quota_bps", "burst")
DEFAULT_GRACE_SECONDS = 24 * 3600.0
MAX_GRACE_SECONDS = 30 * 24 * 3600.0


class AdminApi:
    """The admin operations on one worker: each publishes a control record and waits (a little) for
    this worker's view to show it. The routes are :func:`streamapp.control.views.register_admin`'s."""

    def __init__(self, settings: Settings, control: ControlPlane) -> None:
        self.settings = settings
        self.control = control
        self.view = control.view

    # ----------------------------------------------------------------- plumbing
    def authorize(self, request: web.Request) -> None:
        access = admin_token_check(self.settings.admin_token, request.headers.get("Authorization"))
        if access is AdminAccess.DISABLED:
            raise ApiError(403, "AdminDisabledError", "the admin API is disabled (STREAMAPP_ADMIN_TOKEN is empty)")
        if access is AdminAccess.REFUSED:
            raise ApiError(401, "InvalidAdminTokenError", "admin endpoints need 'Authorization: Bearer <admin token>'")

    async def body(self, request: web.Request, *, required: bool = True) -> dict[str, Any]:
        encoding = body_encoding(request)
        if request.content_length is not None and request.content_length > MAX_ADMIN_BODY:
            raise ApiError(413, TOO_LARGE, f"admin request bodies are limited to {MAX_ADMIN_BODY} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
                while chunk := await request.content.readany():
                    size += len(chunk)
                    if size > MAX_ADMIN_BODY:
                        raise ApiError(413, TOO_LARGE, f"admin request bodies are limited to {MAX_ADMIN_BODY} bytes")
                    chunks.append(chunk)
        except (HttpProcessingError, RequestPayloadError, ConnectionResetError) as exc:  # e.g. broken gzip
            raise ApiError(400, INVALID_JSON, f"request body cannot be read: {exc}") from None
        except TimeoutError:
            raise ApiError(408, REQUEST_TIMEOUT, f"body not received within {BODY_TIMEOUT_SECONDS:g}s") from None
        raw = b"".join(chunks)
        if encoding not in IDENTITY_ENCODINGS:
            raw, _ = await inflate(raw, encoding, MAX_ADMIN_BODY)
        if not raw.strip() and not required:
            return {}
        return parse_object(raw)

    async def publish(self, record: dict[str, Any], visible: Callable[[], bool]) -> bool:
        """Publish a control record; True once this worker's view shows it (False after the wait)."""
        deadline = time.monotonic() + CONTROL_START_WAIT_SECONDS
        while getattr(self.control, "_producer", None) is None or not self.control.caught_up.is_set():
            # Right after a worker starts: admin calls are rare, so wait a little rather than fail.
            if time.monotonic() >= deadline:
                raise unavailable("the control plane is still starting", retry_after=1)
            await asyncio.sleep(0.05)
        try:
            await asyncio.wait_for(self.control.publish(record), PUBLISH_TIMEOUT_SECONDS)
        except Exception as exc:  # noqa: BLE001 - any failure means: not written
            raise unavailable(f"could not write to the control topic ({type(exc).__name__})") from None
        deadline = time.monotonic() + VIEW_WAIT_SECONDS
        while not visible():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def describe(self, project: ProjectSettings) -> dict[str, Any]:
        """A project for an admin answer: no key and no key hash, only whether one is set."""
        settings = {k: v for k, v in asdict(project).items() if k not in SECRET_KEY_FIELDS}
        expires = project.previous_key_expires_at if project.previous_key_hash else None
        return {
            **settings,
            "has_key": bool(project.key_hash),
            "previous_key_expires_at": expires,
            "shed_state": self.view.shed_states.get(project.project_id),
            "override": self.view.overrides.get(project.project_id),
        }

    @staticmethod
    def project_id(project_id: object) -> str:
        if not is_valid_name(project_id):
            raise ApiError(
                400, "InvalidProjectIdError", f"bad project_id {preview(project_id)}: {name_rule(project_id)}"
            )
        return str(project_id)

    # ----------------------------------------------------------------- operations
    async def create(self, request: web.Request) -> tuple[int, Any]:
        doc = await self.body(request)
        project_id = self.project_id(doc.get("project_id"))
        s3_streaming = doc.get("s3_streaming", True)
        if not isinstance(s3_streaming, bool):
            raise ApiError(400, "InvalidParameterError", "s3_streaming must be true or false")
        quota = parse_quota(doc, require_any=False)
        bucket = doc.get("bucket", "")
        prefix = doc.get("prefix")
        if not isinstance(bucket, str) or (prefix is not None and not isinstance(prefix, str)):
            raise ApiError(400, "InvalidParameterError", "bucket and prefix must be strings")
        existing = self.view.projects.get(project_id)
        if existing is not None and (existing.key_hash or existing.previous_key_hash or existing.key_revoked_at):
            raise ApiError(
                409,
                "ProjectExistsError",
                f"project {project_id!r} already exists (a new key: POST /admin/projects/{project_id}/key)",
            )
        # A project known only from a quota record (no write key yet) keeps its quota unless given.
        base = asdict(existing) if existing is not None else {}
        base.update(project_id=project_id, s3_streaming=s3_streaming, bucket=bucket, prefix=prefix)
        base.update(quota)
        key = new_write_key()
        base.update(key_hash=hash_key(key), previous_key_hash="", previous_key_expires_at=None, key_revoked_at=None)
        base["created_at"] = time.time()
        project = ProjectSettings(**base)

        def visible() -> bool:
            current = self.view.projects.get(project_id)
            return current is not None and current.key_hash == project.key_hash

        replicated = await self.publish(project_record(project), visible)
        current = self.view.projects.get(project_id)
        if replicated is False and current is not None and current.key_hash and current.key_hash != project.key_hash:
            raise ApiError(409, "ProjectExistsError", f"project {project_id!r} was created concurrently")
        return 201, {**self.describe(project), "write_key": key, "replicated": replicated}

    async def rotate_key(self, request: web.Request, project_id: str) -> dict[str, Any]:
        """A new write key (shown once); the current one stays valid for ``grace_seconds``."""
        project = self.known(project_id)
        doc = await self.body(request, required=False)
        grace = doc.get("grace_seconds", DEFAULT_GRACE_SECONDS)
        if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace <= MAX_GRACE_SECONDS:
            raise ApiError(400, "InvalidParameterError", f"grace_seconds must be a number in 0..{MAX_GRACE_SECONDS:g}")
        key = new_write_key()
        new_hash = hash_key(key)
        old_hash = project.key_hash if grace > 0 else ""
        record = key_record(project_id, new_hash, old_hash, time.time() + grace if old_hash else None)
        replicated = await self.publish(record, lambda: self.key_hash_is(project_id, new_hash))
        expires = record["previous_key_expires_at"]
        return {
            "project_id": project_id,
            "write_key": key,
            "previous_key_expires_at": expires,
            "replicated": replicated,
        }

    async def revoke_key(self, project_id: str) -> dict[str, Any]:
        """No key of the project is valid any more (the current one and one in its grace period)."""
        self.known(project_id)
        record = key_record(project_id, "")
        replicated = await self.publish(record, lambda: self.key_hash_is(project_id, ""))
        return {"project_id": project_id, "revoked": True, "replicated": replicated}

    def known(self, project_id: str) -> ProjectSettings:
        project = self.view.projects.get(self.project_id(project_id))
        if project is None:
            raise ApiError(404, NOT_FOUND, f"project {project_id!r} not found")
        return project

    def key_hash_is(self, project_id: str, key_hash: str) -> bool:
        current = self.view.projects.get(project_id)
        return current is not None and current.key_hash == key_hash and (key_hash or not current.previous_key_hash)

    def list(self) -> dict[str, Any]:
        return {"projects": [self.describe(p) for _, p in sorted(self.view.projects.items())]}

    def get(self, project_id: str) -> dict[str, Any]:
        project = self.view.projects.get(project_id)
        if project is None:
            raise ApiError(404, NOT_FOUND, f"project {project_id!r} not found")
        return self.describe(project)

    async def set_quota(self, request: web.Request, project_id: str) -> dict[str, Any]:
        project_id = self.project_id(project_id)
        quota = parse_quota(await self.body(request), require_any=True)
        # The same record builder as `streamapp quota set`; explicit nulls put a field back to its default.
        record = quota_record(project_id, **{k: v for k, v in quota.items() if v is not None})
        record.update({k: None for k, v in quota.items() if v is None})

        def visible() -> bool:
            current = self.view.projects.get(project_id)
            return current is not None and all(getattr(current, k) == v for k, v in quota.items())

        replicated = await self.publish(record, visible)
        return {"project_id": project_id, **quota, "replicated": replicated}

    async def override(self, request: web.Request, project_id: str, action: str) -> dict[str, Any]:
        project_id = self.project_id(project_id)
        doc = await self.body(request, required=False)
        reason = doc.get("reason", f"manual {action} (admin API)")
        if not isinstance(reason, str) or not reason.strip():
            raise ApiError(400, "InvalidParameterError", "reason must be a non-empty string")
        clear = action == "unshed" and (
            doc.get("clear") is True or request.query.get("clear", "").lower() in ("1", "true", "yes")
        )
        mode = doc.get("mode")
        if mode is not None and (action != "shed" or mode not in MODES):
            raise ApiError(400, "InvalidParameterError", f"mode (shed only) must be one of {MODES}")
        # The same record builder as `streamapp shed|unshed`.
        record = override_record(project_id, "clear" if clear else action, reason.strip(), mode)

        def visible() -> bool:
            current = self.view.overrides.get(project_id)
            if clear:
                return current is None
            return current is not None and current.get("at") == record["at"]

        replicated = await self.publish(record, visible)
        return {"project_id": project_id, "override": None if clear else record, "replicated": replicated}


def parse_quota(doc: Mapping[str, Any], *, require_any: bool) -> dict[str, Any]:
    """The quota fields present in ``doc``, validated: numbers > 0 (burst >= 0) or null for the default."""
    out: dict[str, Any] = {}
    for name in QUOTA_FIELDS:
        if name not in doc:
            continue
        value = doc[name]
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ApiError(400, "InvalidParameterError", f"{name} must be a number or null")
            value = float(value)
            if not (value >= 0 if name == "burst" else value > 0) or value != value or value == float("inf"):
                raise ApiError(400, "InvalidParameterError", f"{name} must be {'>= 0' if name == 'burst' else '> 0'}")
        out[name] = value
    if "shed_mode" in doc:
        mode = doc["shed_mode"]
        if mode is not None and mode not in MODES:
            raise ApiError(400, "InvalidParameterError", f"shed_mode must be one of {MODES} or null")
        out["shed_mode"] = mode
    if require_any and not out:
        raise ApiError(400, "InvalidParameterError", f"give at least one of {(*QUOTA_FIELDS, 'shed_mode')}")
    return out
