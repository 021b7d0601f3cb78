"""The dev stack's child processes: the base class every server and worker process derives from.

Every child is started in its own session (process group) and is stopped by signalling the whole group,
so no grandchild survives. On Linux the children also get ``PR_SET_PDEATHSIG`` so they die with the
Python process even if it is SIGKILLed before it could call ``stop()``; an ``atexit`` hook covers a
normal interpreter exit. (Caveat: the death signal fires when the *thread* that started the child
exits, so start processes from a long-lived thread, e.g. the main thread.)

:class:`ManagedProcess` is any child logging to a file; :class:`ServerProcess` one listening on a port
whose start() waits until a protocol-level probe answers (the broker and the S3 server).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from streamapp.dev.ports import free_port, owns_listener
from streamapp.settings import ENV_PREFIX

#: The checkout the workers run from (importable without `pip install -e .`).
PROJECT_ROOT = Path(__file__).resolve().parents[2]

#: Credentials moto accepts (it does not check them); also what the workers get in dev/tests.
AWS_DUMMY_ENV: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

# Variables of the parent that would silently change how a child behaves (Tansu reads its options
# from env as well; an AWS profile or session token would override the dummy credentials).
_SCRUB_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


class DevStackError(RuntimeError):
    """A dev-stack process failed to start or to answer in time."""


class _PortTaken(DevStackError):
    """The child could not bind its port."""


# Resolved before any fork: calling dlopen in a forked child of a threaded parent can deadlock.
_PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl


def _death_signal(sig: signal.Signals) -> Callable[[], None] | None:
    """preexec_fn that makes the kernel send ``sig`` to the child when its parent dies."""
    if _prctl is None:
        return None
    prctl = _prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig))
        # The parent may already have died between fork and prctl: then nobody would signal us.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


# Strong references on purpose: a process object dropped without stop() must still be reaped at exit.
_LIVE: set[ManagedProcess] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.kill()


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB_ENV and not k.startswith(ENV_PREFIX)}
    env.update(AWS_DUMMY_ENV)
    env["PYTHONUNBUFFERED"] = "1"  # so log_tail() shows what the child printed just now
    if extra:
        env.update(extra)
    return env


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))  # the end is what matters; don't read huge logs whole
            text = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """A child in its own process group, logging to a file; stop() never leaves an orphan."""

    name = "process"
    stop_timeout = 5.0
    #: What the kernel sends the child if this Python process dies without stopping it.
    death_signal = signal.SIGKILL

    def __init__(self, log_dir: str | os.PathLike[str] | None = None) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="streamapp-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._log_offset = 0
        self.log_path: Path = self.log_dir / f"{self.name}.log"

    # -- to be provided by subclasses
    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return child_env()

    def cwd(self) -> Path | None:
        return None

    # -- common behaviour
    @property
    def pid(self) -> int:
        if self._proc is None:
            raise DevStackError(f"{self.name} is not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused

    def log_tail(self, n: int = 50) -> str:
        return _tail(self.log_path, n)

    def _log_since_start(self) -> str:
        """What the current run logged (the file is appended to across restarts on the same port)."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_offset)
                return fh.read(256 * 1024).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _spawn(self) -> None:
        if self.is_running():
            raise DevStackError(f"{self.name} is already running (pid {self.pid})")
        self._paused = False
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            log.write(f"--- {time.strftime('%H:%M:%S')} starting: {' '.join(self.command())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=self.cwd(),
                start_new_session=True,  # own process group: stop() signals the whole group
                # Only calls prctl (resolved before fork) and getppid: safe in a threaded parent.
                preexec_fn=_death_signal(self.death_signal),  # noqa: PLW1509
            )
        with _LIVE_LOCK:
            _LIVE.add(self)

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._proc is None:
            return
        # The group id is the child's pid (start_new_session); it may outlive the leader.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def _fail(self, why: str, kind: type[DevStackError] = DevStackError) -> DevStackError:
        tail = self.log_tail(40)
        self.kill()
        return kind(f"{self.name}: {why}\n--- log tail ({self.log_path}) ---\n{tail}")

    def pause(self) -> None:
        """SIGSTOP the process group: the port stays open (connects succeed) but nothing answers."""
        self._signal_group(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after pause(); state is intact."""
        self._signal_group(signal.SIGCONT)
        self._paused = False

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM the group, SIGKILL it after ``timeout`` seconds; returns the exit code."""
        if self._proc is None:
            return None
        timeout = self.stop_timeout if timeout is None else timeout
        if self._proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            # A stopped process only acts on SIGTERM once continued.
            self._signal_group(signal.SIGCONT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
        return self.kill()

    def kill(self) -> int | None:
        """SIGKILL the whole group right away (also reaps stragglers left after a graceful stop)."""
        if self._proc is None:
            return None
        self._signal_group(signal.SIGKILL)
        code = self._proc.wait()
        self._paused = False
        with _LIVE_LOCK:
            _LIVE.discard(self)
        return code

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError


class ServerProcess(ManagedProcess):
    """A child that listens on one 127.0.0.1 port; start() waits until a protocol-level probe answers."""

    #: Text the child logs when its port is taken (the free_port() race, or a fixed port in use).
    port_in_use_marker = "in use"

    def __init__(self, port: int | None, log_dir: str | os.PathLike[str] | None) -> None:
        super().__init__(log_dir)
        self._auto_port = port is None
        self.port = port if port is not None else free_port()
        self.log_path = self.log_dir / f"{self.name}-{self.port}.log"

    def probe(self) -> bool:
        """One readiness check; may raise OSError."""
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> None:
        """Start (or restart, on the same port) and wait until ready; raise with the log tail if not."""
        for attempt in range(3):
            self._spawn()
            try:
                self._wait_ready(timeout)
                self._auto_port = False  # restarts keep the address stable for clients
                return
            except _PortTaken:
                # Only a port we picked ourselves may be swapped; a fixed one is the caller's choice.
                if not self._auto_port or attempt == 2:
                    raise
                self.port = free_port()
                self.log_path = self.log_dir / f"{self.name}-{self.port}.log"

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.port_in_use_marker in self._log_since_start():
                # Fail fast: Tansu takes ~2 s to exit after its bind panic.
                raise self._fail(f"port {self.port} is in use", _PortTaken)
            if not self.is_running():
                raise self._fail(f"exited with code {self.returncode} during start")
            try:
                # Another local server may answer on "our" port: only our own listener counts
                # (checked first, so a foreign listener that never answers cannot stall us).
                if owns_listener(self.pid, self.port) and self.probe():
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.05)
        raise self._fail(f"not ready on port {self.port} after {timeout:.0f}s (last error: {last!r})")
