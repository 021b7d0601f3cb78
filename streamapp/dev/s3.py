"""The dev stack's S3: moto's server as a child process, and a boto3 client for a local endpoint."""

from __future__ import annotations

import contextlib
import os
import sys
import urllib.request
from typing import Any

from streamapp.dev.ports import HOST
from streamapp.dev.processes import AWS_DUMMY_ENV, ServerProcess


def s3_client(endpoint_url: str, *, region: str = "us-east-1", timeout: float = 10.0, retries: int = 2) -> Any:
    """boto3 S3 client for a local endpoint: dummy credentials, path-style addressing, short timeouts."""
    import boto3  # imported when a client is made: boto3 takes ~0.5 s to import
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


class S3Process(ServerProcess):
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
