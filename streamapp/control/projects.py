"""A project as the control topic has it, and its write keys (kept only as SHA-256 hashes).

Pure data and hashing, no I/O: the control view builds these, the admin API and the CLI make
keys, the HTTP edge checks them (:func:`streamapp.web.auth.key_matches`).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field


@dataclass
class ProjectSettings:
    """A project as the control topic has it. Write keys are kept only as hashes (:func:`hash_key`):
    the key itself is shown once, when it is made, and never written anywhere."""

    project_id: str
    key_hash: str = ""  # "" = no valid key (revoked, or created by a quota record only)
    previous_key_hash: str = ""  # the key before the last rotation, valid until ...
    previous_key_expires_at: float | None = None  # ... this epoch time
    key_revoked_at: float | None = None  # set by a revocation (until the next rotation)
    s3_streaming: bool = True
    bucket: str = ""  # empty: the global bucket
    prefix: str | None = None  # None: the global prefix
    quota_eps: float | None = None  # None: the default quota
    quota_bps: float | None = None
    burst: float | None = None
    shed_mode: str | None = None  # None: the default mode
    created_at: float = field(default_factory=time.time)


def new_write_key() -> str:
    return secrets.token_hex(32)


KEY_HASH_PREFIX = "sha256:"


def hash_key(key: str) -> str:
    """The stored form of a write key. Plain SHA-256 is enough: keys are 256 random bits, so there
    is nothing to brute-force that a slow hash would protect (and it keeps the write path cheap)."""
    return KEY_HASH_PREFIX + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


#: The key fields of ProjectSettings: changed only by ``key`` records; hashes never leave the view.
KEY_FIELDS = ("key_hash", "previous_key_hash", "previous_key_expires_at", "key_revoked_at")
SECRET_KEY_FIELDS = ("key_hash", "previous_key_hash")
