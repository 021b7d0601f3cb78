"""One typed settings object, read from ``STREAMAPP_*`` environment variables.

Every knob of the service lives here, with its default and meaning, so that
the README table, the app factory and the tests all read the same thing.
``Settings.from_env()`` validates at start and names the bad variable.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from streamapp.enrichment import parse_trusted_proxies
from streamapp.metering import SHED_MODES

ENV_PREFIX = "STREAMAPP_"


class SettingsError(ValueError):
    """A ``STREAMAPP_*`` variable has a value the service cannot use."""


def _doc(text: str, **kwargs: Any) -> Any:
    return field(metadata={"doc": text}, **kwargs)


@dataclass(frozen=True)
class Settings:
    # --- Kafka ---
    kafka_bootstrap: str = _doc("Kafka bootstrap servers, host:port[,host:port]", default="127.0.0.1:9092")
    app_id: str = _doc("Faust app id: consumer group and prefix of changelog topics", default="streamapp")
    events_topic: str = _doc("Topic of incoming events (the event contract)", default="events")
    topic_partitions: int = _doc("Partitions of the events topic and all co-partitioned topics", default=4)
    topic_replicas: int = _doc("Replication factor of topics the app creates", default=1)
    max_record_bytes: int = _doc("Largest accepted Kafka record value; larger ones are invalid", default=1_000_000)
    max_event_bytes: int = _doc("Largest accepted single event (JSON bytes; Keen: 900,000)", default=900_000)
    unknown_projects: str = _doc(
        "Kafka events of projects not created in the control plane: shared (exported, metered and shed"
        " as one pseudo-project per partition), export (each its own quota) or dead-letter",
        default="shared",
    )
    # --- S3 ---
    s3_endpoint_url: str = _doc("S3 endpoint URL; empty means AWS", default="")
    s3_region: str = _doc("S3 region", default="us-east-1")
    s3_bucket: str = _doc("Default bucket for exported events", default="streamapp-events")
    s3_prefix: str = _doc("Default key prefix for exported events", default="events")
    s3_streaming_default: bool = _doc("Export projects that have no settings of their own", default=True)
    s3_upload_concurrency: int = _doc(
        "Parallel S3 uploads per worker (many small objects need many: 50,000 a window at 100 ms a PUT)",
        default=32,
    )
    s3_retry_max_seconds: float = _doc("Cap of the exponential backoff between S3 retries", default=10.0)
    s3_timeout_seconds: float = _doc("Connect/read timeout of one S3 request before it is retried", default=30.0)
    s3_parked_retry_seconds: float = _doc(
        "Seconds between redelivery attempts of a parked project's objects (its own bucket failing)", default=30.0
    )
    # --- windows ---
    window_seconds: int = _doc("S3 tumbling window length in seconds (Keen: 300)", default=300)
    allowed_lateness_seconds: int = _doc("Event-time lateness before a window closes", default=60)
    idle_flush_seconds: float = _doc(
        "Wall-clock idle time after which a quiet partition is ticked forward", default=10.0
    )
    max_object_bytes: int = _doc("Uncompressed bytes after which a window object is rotated", default=64 * 1024 * 1024)
    max_future_seconds: float = _doc(
        "An event time further ahead of its record's timestamp is windowed at the record's time", default=3600.0
    )
    # --- metering / shedding ---
    default_eps_limit: float = _doc("Default per-project quota, events/s", default=1000.0)
    default_bps_limit: float = _doc("Default per-project quota, bytes/s", default=2_000_000.0)
    burst_tolerance: float = _doc("Shed when rate > quota x (1 + this)", default=0.5)
    shed_exit_ratio: float = _doc("Unshed when rate < quota x this for the cooldown", default=0.8)
    shed_cooldown_seconds: float = _doc("Seconds under the exit threshold before unshedding", default=30.0)
    shed_mode: str = _doc("Default shed mode: divert, drop or shadow", default="divert")
    burst_horizon_seconds: int = _doc("Horizon of the short (burst) rate estimate", default=10)
    sustained_horizon_seconds: int = _doc("Horizon of the sustained rate estimate", default=60)
    idle_project_seconds: float = _doc(
        "Seconds without events after which a project's in-memory state is forgotten (at least the rate horizons)",
        default=300.0,
    )
    overflow_max_eps: float = _doc("Ceiling of the overflow drain rate, events/s", default=20_000.0)
    overflow_floor_fraction: float = _doc(
        "Share of the drain's ceiling it keeps while the real-time export is behind (it never stops)", default=0.05
    )
    drain_processes: int = _doc(
        "Processes the overflow drain exports diverted events in (0: in the worker's loop); cores the "
        "real-time path leaves idle make a backlog's catch-up that much faster",
        default=0,
    )
    health_backlog_seconds: float = _doc(
        "Sink backlog age that tightens quotas of the heaviest projects", default=120.0
    )
    # --- HTTP / web ---
    web_host: str = _doc("Bind address of the worker web server", default="127.0.0.1")
    web_port: int = _doc("Port of the worker web server", default=6066)
    admin_token: str = _doc("Bearer token for /admin endpoints; empty disables them", default="")
    read_token: str = _doc(
        "Bearer token for read views (header or dashboard cookie, never a URL); required when web_host is "
        "not loopback, optional (empty = open) on a loopback bind",
        default="",
    )
    peer_token: str = _doc(
        "Token workers send each other on view fan-out; empty = derived from the read token", default=""
    )
    api_max_inflight: int = _doc("In-flight Kafka produce requests before the API answers 503", default=256)
    api_max_body_bytes: int = _doc("Largest HTTP request body", default=10 * 1024 * 1024)
    api_produce_timeout_seconds: float = _doc("Produce wait before the API answers 503", default=5.0)
    trusted_proxies: str = _doc(
        "Comma-separated addresses/CIDRs of our own proxies: only their X-Forwarded-For sets ${keen.ip}",
        default="",
    )
    api_max_batch_events: int = _doc("Most events in one batch request; more is a 413 (nothing written)", default=5000)
    api_max_batch_collections: int = _doc(
        "Most collections in one batch request; more is a 413 (nothing written)", default=100
    )
    api_body_read_timeout_seconds: float = _doc(
        "Deadline to receive a whole request body; a slower client gets 408", default=10.0
    )
    api_max_body_bytes_in_flight: int = _doc(
        "Request-body bytes all requests may be reading at once (declared or received); beyond: 503",
        default=64 * 1024 * 1024,
    )
    # --- worker ---
    rebalance_timeout_seconds: float = _doc(
        "Consumer group rebalance timeout (Tansu makes a first join wait this long)", default=5.0
    )
    session_timeout_seconds: float = _doc("Consumer group session timeout", default=10.0)
    data_dir: str = _doc("Local state (RocksDB tables)", default="./data")
    store: str = _doc("Faust table store URL", default="rocksdb://")
    log_level: str = _doc("Worker log level", default="info")
    control_secret: str = _doc(
        "Cluster secret that signs control records (ticks, shed markers); required; `new,old` while rotating",
        default="",
        repr=False,
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``STREAMAPP_<FIELD>`` variables; raise SettingsError naming a bad one."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            if f.name in overrides:
                values[f.name] = overrides[f.name]
            elif name in env:
                values[f.name] = _parse(name, env[name], f.type)
        settings = cls(**values)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> Settings:
        settings = dataclasses.replace(self, **changes)
        settings.validate()
        return settings

    def validate(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()}={getattr(self, name)!r}: {why}")

        for name in (
            "topic_partitions",
            "window_seconds",
            "max_record_bytes",
            "max_event_bytes",
            "s3_upload_concurrency",
            "api_max_inflight",
            "api_max_batch_events",
            "api_max_batch_collections",
            "api_max_body_bytes_in_flight",
            "web_port",
            "max_object_bytes",
            "burst_horizon_seconds",
            "sustained_horizon_seconds",
        ):
            need(getattr(self, name) > 0, name, "must be > 0")
        need(self.s3_parked_retry_seconds > 0, "s3_parked_retry_seconds", "must be > 0")
        need(self.allowed_lateness_seconds >= 0, "allowed_lateness_seconds", "must be >= 0")
        need(self.max_future_seconds >= 0, "max_future_seconds", "must be >= 0")
        need(self.default_eps_limit > 0, "default_eps_limit", "must be > 0")
        need(self.idle_project_seconds > 0, "idle_project_seconds", "must be > 0")
        need(self.default_bps_limit > 0, "default_bps_limit", "must be > 0")
        need(0 < self.shed_exit_ratio <= 1, "shed_exit_ratio", "must be in (0, 1]")
        need(0 < self.overflow_floor_fraction <= 1, "overflow_floor_fraction", "must be in (0, 1]")
        need(0 <= self.drain_processes <= 64, "drain_processes", "must be 0-64")
        need(self.shed_mode in SHED_MODES, "shed_mode", "must be divert, drop or shadow")
        need(
            self.unknown_projects in ("shared", "export", "dead-letter"),
            "unknown_projects",
            "must be shared, export or dead-letter",
        )
        need(bool(self.s3_bucket), "s3_bucket", "must not be empty")
        need(":" in self.kafka_bootstrap, "kafka_bootstrap", "must be host:port")
        need(self.window_seconds <= 86400, "window_seconds", "must be <= 86400")
        try:
            parse_trusted_proxies(self.trusted_proxies)
        except ValueError as exc:
            need(False, "trusted_proxies", f"must be comma-separated IP addresses or CIDR networks ({exc})")
        need(self.api_body_read_timeout_seconds > 0, "api_body_read_timeout_seconds", "must be > 0")
        need(
            self.api_max_body_bytes_in_flight >= self.api_max_body_bytes,
            "api_max_body_bytes_in_flight",
            "must be >= STREAMAPP_API_MAX_BODY_BYTES (one largest body must fit)",
        )
        need(
            bool(self.read_token) or is_loopback(self.web_host),
            "read_token",
            f"must be set when STREAMAPP_WEB_HOST={self.web_host!r} is not a loopback address "
            "(127.0.0.1, ::1, localhost): read views are not served open to a network",
        )

    @property
    def broker_url(self) -> str:
        return ";".join(f"streamapp://{hp.strip()}" for hp in self.kafka_bootstrap.split(","))

    def topic_name(self, suffix: str) -> str:
        """Name of a topic derived from the events topic (``events-invalid`` ...)."""
        return f"{self.events_topic}-{suffix}"

    @staticmethod
    def documentation() -> list[tuple[str, str, str]]:
        """(variable, default, meaning) rows for the README."""
        rows = []
        for f in fields(Settings):
            rows.append((ENV_PREFIX + f.name.upper(), repr(f.default), f.metadata.get("doc", "")))
        return rows


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost", "[::1]"})


def is_loopback(host: str) -> bool:
    """True when a bind address only accepts connections from this machine."""
    host = host.strip().lower()
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def _parse(name: str, raw: str, type_name: Any) -> Any:
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    try:
        if kind == "bool":
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError("expected true/false")
        if kind == "int":
            return int(raw.replace("_", ""))
        if kind == "float":
            return float(raw)
        return raw
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r}: expected {kind} ({exc})") from None
