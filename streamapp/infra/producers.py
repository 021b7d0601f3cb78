"""The worker's own aiokafka producers (the HTTP API's, the overflow lane's), apart from Faust's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)


async def start_producer(config: Mapping[str, Any], what: str, retry_seconds: float) -> AIOKafkaProducer:
    """A started producer of ``config``, retrying while the broker cannot be reached: a worker may
    start before its broker (a dev stack, a cluster restart) and must not die of it."""
    while True:
        producer = AIOKafkaProducer(**config)
        try:
            await producer.start()
        except KafkaError as exc:
            log.warning("%s producer cannot start yet (%r); retrying", what, exc)
            with contextlib.suppress(Exception):
                await producer.stop()
            await asyncio.sleep(retry_seconds)
            continue
        return producer
