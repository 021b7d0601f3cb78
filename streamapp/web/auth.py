"""Every credential check of the HTTP edge, in one place.

* write keys (the Keen write API): where a Keen client puts its key (:func:`write_key_from`) and
  whether it is a project's key (:func:`key_matches`: hashes compared in constant time, the same
  work for an unknown project as for a wrong key);
* the admin token (``Authorization: Bearer``, the admin API): :func:`admin_token_check`;
* the read token (read views, ``/metrics``, the dashboard): the token itself, the peer token the
  workers send each other, or the dashboard's session cookie (:func:`read_allowed`); never a token
  in a URL (:func:`token_in_url`).

Pure functions of the request's headers, query and cookies (no I/O, no clock reads: ``now`` is
passed in); the views turn a refusal into their own answer shape.
"""

from __future__ import annotations

import hashlib
import hmac
from enum import Enum
from typing import Any

from streamapp.control import KEY_HASH_PREFIX, ProjectSettings, hash_key
from streamapp.settings import Settings

# ------------------------------------------------------------------------------------ write keys


def write_key_from(authorization: str | None, api_key_param: str | None) -> str | None:
    """The key a Keen client sent: the raw ``Authorization`` header, else the ``api_key`` query parameter."""
    if authorization:
        return authorization.strip()
    if api_key_param:
        return api_key_param.strip()
    return None


#: Compared when a project is unknown, so that an unknown id costs the same as a wrong key.
_NO_PROJECT_HASH = KEY_HASH_PREFIX + "0" * 64


def key_matches(project: ProjectSettings | None, provided: str, now: float) -> bool:
    """Is ``provided`` the project's key, or its previous key within the rotation grace period?

    Constant time in the key (hashes compared with hmac.compare_digest), and the same work for an
    unknown project (None) as for a wrong key.
    """
    given = hash_key(provided).encode()
    if project is None:
        # The same two comparisons as for a known project with a wrong key.
        hmac.compare_digest(given, _NO_PROJECT_HASH.encode())
        hmac.compare_digest(given, _NO_PROJECT_HASH.encode())
        return False
    key_hash, previous_hash = project.key_hash, project.previous_key_hash
    # Type checks: a malformed control record must read as "no key", never raise on the write path.
    current = isinstance(key_hash, str) and hmac.compare_digest(given, key_hash.encode()) and bool(key_hash)
    expires = project.previous_key_expires_at
    previous = (
        isinstance(previous_hash, str)
        and hmac.compare_digest(given, previous_hash.encode())
        and bool(previous_hash)
        and isinstance(expires, int | float)
        and now < expires
    )
    return current or previous


# ---------------------------------------------------------------------------------- admin token


def keys_match(provided: str | None, expected: str) -> bool:
    """Constant-time comparison; an empty expected key (a project without one) never matches."""
    if not expected or provided is None:
        return False
    return hmac.compare_digest(provided.encode("utf-8", "replace"), expected.encode("utf-8"))


def bearer_token(authorization: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class AdminAccess(Enum):
    """The admin token check's verdict."""

    ALLOWED = "allowed"
    DISABLED = "disabled"  # no admin token configured: the admin API is off
    REFUSED = "refused"  # no bearer token, or not the admin token


def admin_token_check(admin_token: str, authorization: str | None) -> AdminAccess:
    """May a request with this ``Authorization`` header use the admin API? Constant-time."""
    if not admin_token:
        return AdminAccess.DISABLED
    if not keys_match(bearer_token(authorization), admin_token):
        return AdminAccess.REFUSED
    return AdminAccess.ALLOWED


# ----------------------------------------------------------------------------------- read token

#: The dashboard's session cookie (HttpOnly, SameSite=Strict): a value derived from the read token.
READ_COOKIE = "streamapp_read"
#: Query parameters that would carry a credential in a URL: refused on read views.
URL_TOKEN_PARAMS = ("token", "access_token", "read_token")


def _derive(secret: str, purpose: bytes) -> str:
    return hmac.new(secret.encode(), purpose, hashlib.sha256).hexdigest()


def peer_token(read_token: str, configured: str = "") -> str:
    """The token workers send each other: STREAMAPP_PEER_TOKEN, else derived from the read token
    (every worker of a deployment has the same read token, so they derive the same one)."""
    if configured:
        return configured
    return _derive(read_token, b"streamapp peer token v1") if read_token else ""


def session_cookie_value(read_token: str) -> str:
    """The dashboard cookie's value: derived, so the read token itself is not stored in the browser."""
    return _derive(read_token, b"streamapp dashboard session v1")


def request_token(request: Any) -> str:
    """The bearer token of a request: ``Authorization: Bearer`` only (never the URL)."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return ""


def token_in_url(request: Any) -> bool:
    return any(name in request.query for name in URL_TOKEN_PARAMS)


def read_allowed(request: Any, read_token: str, configured_peer_token: str = "") -> bool:
    """True when read views are open (no read token: loopback only) or the request carries the
    read token, the peer token or the dashboard cookie. Constant-time comparisons."""
    if not read_token:
        return True
    given = request_token(request).encode()
    if given:
        peer = peer_token(read_token, configured_peer_token)
        return any(hmac.compare_digest(given, t.encode()) for t in (read_token, peer) if t)
    cookies = getattr(request, "cookies", None) or {}
    cookie = str(cookies.get(READ_COOKIE, ""))
    return bool(cookie) and hmac.compare_digest(cookie.encode(), session_cookie_value(read_token).encode())


def is_read_token(request: Any, read_token: str) -> bool:
    """Does the request carry the read token itself (not a cookie, not the peer token)? What opens
    a dashboard session."""
    return hmac.compare_digest(request_token(request).encode(), read_token.encode())


def forward_headers(settings: Settings) -> dict[str, str]:
    """Headers of a request to a peer: the peer token, never anything the caller sent."""
    token = peer_token(settings.read_token, settings.peer_token)
    return {"Authorization": f"Bearer {token}"} if token else {}
