"""Everything one worker holds besides the Faust app: settings, topics, S3, control plane, sink."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

import faust

from streamapp.control import ControlPlane
from streamapp.metrics import Metrics
from streamapp.overflow import OverflowLane
from streamapp.settings import Settings
from streamapp.sink import CheckpointStore, Parking, S3Sink, S3Writer, Target
from streamapp.topics import Topics

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, app: faust.App, settings: Settings, topics: Topics) -> None:
        self.app = app
        self.settings = settings
        self.topics = topics
        self.metrics = Metrics()
        self.s3 = S3Writer(settings)
        self.control = ControlPlane(settings)
        # The sink's and the drain's collaborators (streamapp.sink, streamapp.overflow), explicit.
        self.checkpoints = CheckpointStore(self.s3, settings.s3_bucket, settings.s3_prefix, settings.app_id)
        self.parking = Parking(  # a tenant's failing bucket: park its objects (streamapp.sink.parking)
            app=app, settings=settings, s3=self.s3, objects_topic=topics.objects.get_topic_name(), spawn=self.spawn
        )
        self.sink = S3Sink(
            app=app,
            settings=settings,
            s3=self.s3,
            checkpoints=self.checkpoints,
            parking=self.parking,
            overflow=OverflowLane(app, settings),
            control=self.control,
            export_target=self.export_target,
            invalid_topic=topics.invalid.get_topic_name(),
            overflow_topic=topics.overflow.get_topic_name(),
            objects_topic=topics.objects.get_topic_name(),
            metrics=self.metrics,
            spawn=self.spawn,
        )
        self._background: set[asyncio.Future[Any]] = set()
        self.background_failures = 0

    def export_target(self, project_id: str) -> Target | None:
        """(bucket, prefix) where a project's events go, or None when it does not stream to S3."""
        project = self.control.view.projects.get(project_id)
        if project is None:
            if not self.settings.s3_streaming_default:
                return None
            return (self.settings.s3_bucket, self.settings.s3_prefix)
        if not project.s3_streaming:
            return None
        prefix = project.prefix if project.prefix is not None else self.settings.s3_prefix
        return (project.bucket or self.settings.s3_bucket, prefix)

    def spawn(self, awaitable: Awaitable[Any]) -> None:
        """Run in the background, keeping a reference and logging failures."""
        future = asyncio.ensure_future(awaitable)
        self._background.add(future)
        future.add_done_callback(self._finished)

    def _finished(self, future: asyncio.Future[Any]) -> None:
        self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            # Bounded: at shutdown every notice still queued fails the same way (the producer has
            # stopped), and 50,000 of them must not become 50,000 log lines.
            self.background_failures += 1
            if self.background_failures <= 10 or self.background_failures % 1000 == 0:
                log.warning("background task failed (%d so far): %r", self.background_failures, future.exception())
