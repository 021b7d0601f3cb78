"""The base of every read view: the read-token gate, and query parameters parsed into a 400.

Security: when ``STREAMAPP_READ_TOKEN`` is set (it must be on a non-loopback bind: Settings
refuses to start otherwise), a :class:`ReadView` needs ``Authorization: Bearer <read token>``,
the peer token or the dashboard's session cookie (the checks: :mod:`streamapp.web.auth`). A
token in the URL (``?token=``) is refused with 400: URLs end up in logs and histories. The admin
token is not a read token. No read view returns event payloads: only counts, rates, states and
offsets (and Faust's own ``/table/`` dumps are disabled in ``create_app``).
"""

from __future__ import annotations

from typing import Any

from faust.web import View

from streamapp.settings import Settings
from streamapp.web.auth import read_allowed, token_in_url


class BadRequest(ValueError):
    """A query parameter out of range: a 400 with the message."""


def query_int(request: Any, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be in {lo}..{hi}, got {value}")
    return value


def query_float(request: Any, name: str, default: float) -> float:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number, got {raw!r}") from None
    if not value >= 0:
        raise BadRequest(f"{name} must be >= 0, got {raw!r}")
    return value


class ReadView(View):
    """A view behind the read token (required on non-loopback binds)."""

    settings: Settings  # set on the subclasses by the register_* functions that mount them

    async def dispatch(self, request: Any) -> Any:
        settings = self.settings
        if token_in_url(request):
            return self.json(
                {"error": "tokens in URLs are refused (they end up in logs): send Authorization: Bearer <token>"},
                status=400,
            )
        if not read_allowed(request, settings.read_token, settings.peer_token):
            return self.json(
                {"error": "unauthorized: send Authorization: Bearer <read token>"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="streamapp"'},
            )
        try:
            return await super().dispatch(request)
        except BadRequest as exc:
            return self.json({"error": str(exc)}, status=400)
