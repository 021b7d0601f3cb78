"""HTTP calls to a running worker from outside it (the CLI's commands, ``streamapp replay``): its
read views (:func:`get_json`) and its admin API (:func:`admin_request`, with :func:`admin_target`
for the default URL and token). Standard library only: the commands load no web framework."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from streamapp.settings import Settings


def get_json(url: str, token: str = "", timeout: float = 2.0) -> dict[str, Any]:
    """GET a JSON view (with the bearer ``token`` when given); OSError when nothing answers."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class AdminApiError(RuntimeError):
    """An /admin/ call answered with an error status (``status`` 0: nothing answered)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


def admin_target(web: str | None, token: str | None) -> tuple[str, str]:
    """(base URL, admin token): the arguments, else http://127.0.0.1:$STREAMAPP_WEB_PORT and $STREAMAPP_ADMIN_TOKEN."""
    settings = Settings.from_env()
    base = (web or f"http://127.0.0.1:{settings.web_port}").rstrip("/")
    return base, settings.admin_token if token is None else token


def admin_request(
    web: str, token: str, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 15.0
) -> dict[str, Any]:
    """Call an admin endpoint; the decoded JSON answer, or AdminApiError with the server's message."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    request = urllib.request.Request(web + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        try:
            message = str(json.loads(payload).get("message"))
        except (ValueError, AttributeError):
            message = payload.decode("utf-8", "replace")[:200]
        raise AdminApiError(exc.code, message) from None
    except OSError as exc:
        raise AdminApiError(0, f"{web} not answering: {exc}") from None
