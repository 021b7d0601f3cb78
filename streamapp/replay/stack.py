"""Where an arm runs: a fresh embedded stack (broker + moto S3 + worker on free ports), or the
configured Kafka/S3 (``--external``) with a fresh topic, consumer group and key prefix per arm.
Either way the replay starts its own worker, since the arm decides the shed mode."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamapp.dev import BrokerProcess, S3Process, WorkerProcess, s3_client
from streamapp.settings import Settings
from streamapp.web.client import AdminApiError, admin_request


@dataclass
class ArmStack:
    """The servers of one arm; ``start()`` returns once the worker's API answers."""

    arm: str
    log_dir: Path
    worker_settings: dict[str, object]
    external: bool = False
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    broker: BrokerProcess | None = None
    s3: S3Process | None = None
    worker: WorkerProcess | None = None
    settings: dict[str, object] = field(default_factory=dict)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.external:
                base = Settings.from_env()
                self.settings = {
                    "kafka_bootstrap": base.kafka_bootstrap,
                    "s3_endpoint_url": base.s3_endpoint_url,
                    "s3_region": base.s3_region,
                    "s3_bucket": base.s3_bucket,
                    "s3_prefix": f"replay/{self.run_id}/{self.arm}",
                    "events_topic": f"replay-{self.run_id}-{self.arm}",
                    "app_id": f"replay-{self.run_id}-{self.arm}",
                    "control_secret": base.control_secret,  # the cluster's: required, as for any worker
                }
            else:
                self.broker = BrokerProcess(log_dir=self.log_dir)
                self.broker.start()
                self.s3 = S3Process(log_dir=self.log_dir)
                self.s3.start()
                self.s3.create_bucket("replay-events")
                self.settings = {
                    "kafka_bootstrap": self.broker.bootstrap,
                    "s3_endpoint_url": self.s3.endpoint_url,
                    "s3_bucket": "replay-events",
                    "s3_prefix": "events",
                    "control_secret": secrets.token_hex(32),  # one per embedded stack, like `streamapp dev`
                }
            self.settings.update(
                self.worker_settings,
                admin_token=self.admin_token,
                data_dir=str(self.log_dir / "data"),
                log_level="warn",
            )
            # The embedded stack takes streamapp.dev's dummy credentials; a real S3 needs the caller's own.
            aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")} if self.external else {}
            self.worker = WorkerProcess(self.settings, self.log_dir, name=f"worker-{self.arm}", extra_env=aws)
            self.worker.start()
            self.worker.wait_ready(timeout=180)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        # The arm's data is in memory and measured already: no need for a long graceful shutdown.
        for proc in (self.worker, self.s3, self.broker):
            if proc is not None:
                proc.stop(timeout=5.0)

    @property
    def web(self) -> str:
        assert self.worker is not None
        return self.worker.web_url

    @property
    def bootstrap(self) -> str:
        return str(self.settings["kafka_bootstrap"])

    @property
    def topic(self) -> str:
        return str(self.settings.get("events_topic", "events"))

    @property
    def objects_topic(self) -> str:
        """Where the worker notes each object it writes (named as the worker names it)."""
        return Settings(events_topic=self.topic).topic_name("s3-objects")

    @property
    def bucket(self) -> str:
        return str(self.settings["s3_bucket"])

    @property
    def prefix(self) -> str:
        return str(self.settings["s3_prefix"])

    def s3_client(self) -> Any:
        endpoint = str(self.settings.get("s3_endpoint_url") or "")
        if not self.external:
            return s3_client(endpoint, timeout=30)
        import boto3  # slow to import (~0.5 s): only for a replay against a real S3 (--external)

        return boto3.client(
            "s3", endpoint_url=endpoint or None, region_name=str(self.settings.get("s3_region", "us-east-1"))
        )

    def create_project(self, project_id: str, quota_eps: float) -> str:
        """Create ``project_id`` through the admin API (retrying while the worker warms up); its write key."""
        body = {"project_id": project_id, "s3_streaming": True, "quota_eps": quota_eps, "quota_bps": quota_eps * 4000}
        deadline = time.monotonic() + 120
        while True:
            try:
                answer = admin_request(self.web, self.admin_token, "POST", "/admin/projects", body, timeout=30)
                return str(answer["write_key"])
            except AdminApiError as exc:
                if exc.status != 503 or time.monotonic() > deadline:
                    raise RuntimeError(f"creating {project_id}: {exc}") from None
            time.sleep(1.0)
