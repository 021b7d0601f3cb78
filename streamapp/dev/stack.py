"""The embedded stack as one object: a broker and an S3 server (with the bucket), and workers for them."""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from streamapp.dev.broker import BrokerProcess
from streamapp.dev.s3 import S3Process
from streamapp.dev.worker import WorkerProcess, settings_env


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
