"""A streamapp worker as a child process (``python -m streamapp worker``), and its settings as env."""

from __future__ import annotations

import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path

from streamapp.dev.ports import HOST, free_port
from streamapp.dev.processes import PROJECT_ROOT, DevStackError, ManagedProcess, child_env
from streamapp.settings import ENV_PREFIX, Settings

_FIELD_NAMES = {f.name for f in fields(Settings)}


def settings_env(settings: Mapping[str, object] | None = None, **kwargs: object) -> dict[str, str]:
    """``STREAMAPP_*`` variables from Settings field names (``web_port=1``) or full variable names.

    Unknown names raise KeyError, so a typo in a test cannot silently fall back to a default.
    """
    out: dict[str, str] = {}
    for key, value in {**(settings or {}), **kwargs}.items():
        field_name = key[len(ENV_PREFIX) :].lower() if key.startswith(ENV_PREFIX) else key.lower()
        if field_name not in _FIELD_NAMES:
            raise KeyError(f"unknown streamapp setting {key!r}")
        if isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        out[ENV_PREFIX + field_name.upper()] = text
    return out


class WorkerProcess(ManagedProcess):
    """``python -m streamapp worker`` with the given ``STREAMAPP_*`` settings.

    The parent's own ``STREAMAPP_*`` variables are dropped so only ``settings`` count. A missing
    ``STREAMAPP_WEB_PORT`` gets a free port (several workers per host need distinct ones).
    """

    name = "worker"
    stop_timeout = 20.0
    death_signal = signal.SIGTERM  # let an orphaned worker shut down cleanly
    _counter = 0

    def __init__(
        self,
        settings: Mapping[str, object] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
        command: Sequence[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(log_dir)
        self.settings = settings_env(settings)
        self.settings.setdefault(ENV_PREFIX + "WEB_PORT", str(free_port()))
        WorkerProcess._counter += 1
        self.name = name or f"worker-{WorkerProcess._counter}-{self.web_port}"
        self.log_path = self.log_dir / f"{self.name}.log"
        self._command = list(command) if command is not None else [sys.executable, "-m", "streamapp", "worker"]
        self._cwd = Path(cwd) if cwd is not None else PROJECT_ROOT
        self.extra_env = dict(extra_env or {})

    @property
    def web_port(self) -> int:
        return int(self.settings[ENV_PREFIX + "WEB_PORT"])

    @property
    def web_url(self) -> str:
        host = self.settings.get(ENV_PREFIX + "WEB_HOST", HOST)
        host = HOST if host in ("0.0.0.0", "") else host
        return f"http://{host}:{self.web_port}"

    def command(self) -> list[str]:
        return list(self._command)

    def cwd(self) -> Path:
        return self._cwd

    def environment(self) -> dict[str, str]:
        env = child_env({**self.settings, **self.extra_env})
        # Importable from a checkout without `pip install -e .`.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    def start(self) -> None:
        """Spawn; does not wait (call wait_ready())."""
        self._spawn()

    def health(self, timeout: float = 2.0) -> int | None:
        """HTTP status of GET /healthz, or None when nothing answers."""
        try:
            with urllib.request.urlopen(f"{self.web_url}/healthz", timeout=timeout) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (OSError, urllib.error.URLError):
            return None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll /healthz until 200; raise with the log tail if the worker exits or time runs out."""
        deadline = time.monotonic() + timeout
        status: int | None = None
        while time.monotonic() < deadline:
            if not self.is_running():
                raise DevStackError(
                    f"{self.name} exited with code {self.returncode} before it was ready\n"
                    f"--- log tail ({self.log_path}) ---\n{self.log_tail(60)}"
                )
            status = self.health()
            if status == 200:
                return
            time.sleep(0.2)
        raise DevStackError(
            f"{self.name}: /healthz not 200 after {timeout:.0f}s (last status {status})\n"
            f"--- log tail ({self.log_path}) ---\n{self.log_tail(60)}"
        )
