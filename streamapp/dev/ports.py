"""Ports on 127.0.0.1 for the dev stack's servers: pick a free one, check who listens on one."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel may hand it out again later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def owns_listener(pid: int, port: int) -> bool:
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
