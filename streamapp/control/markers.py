"""Authenticated control records: watermark ticks and shed markers in the events topic.

Control records (keys ``contract.TICK_KEY`` and ``contract.SHED_KEY``) live in the events
partitions so a replay meets them at the same place as the first read. Anyone who can produce
to ``events`` could write such a key, so a worker obeys one only if its
``contract.CONTROL_SIG_HEADER`` header carries an HMAC-SHA256, under the cluster secret
(``STREAMAPP_CONTROL_SECRET``), of the topic, the partition it was written for, the key and the
value. So a forged record is refused, and a genuine one copied into another partition or topic
is refused too (its signature names where it belongs). The check depends only on the record's
bytes and the secret: a record valid once is valid on every replay, as long as the secret is
kept. To rotate, set ``new,old`` on every worker (the first signs, each one verifies), and drop
``old`` once the log holds no record it signed (see the README).

Pure functions, no clock: the sink and the meter sign when they write and verify when they read.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from streamapp.contract import CONTROL_SIG_HEADER, SHED_KEY, TICK_KEY
from streamapp.metering import NOT_SHED, SHED_MODES

_VERSION = b"streamapp-control-v1"


def control_secrets(setting: str) -> tuple[bytes, ...]:
    """The secrets of ``STREAMAPP_CONTROL_SECRET`` (``new,old`` while rotating): the first signs."""
    return tuple(part.strip().encode() for part in setting.split(",") if part.strip())


def control_signature(secret: bytes, topic: str, partition: int, key: bytes, value: bytes) -> bytes:
    """HMAC-SHA256 (hex, ASCII) of a control record for ``topic``/``partition``.

    Fields are length-prefixed, so no two different (topic, partition, key, value) share a message.
    """
    mac = hmac.new(secret, _VERSION, hashlib.sha256)
    for part in (topic.encode(), str(partition).encode(), key, value):
        mac.update(len(part).to_bytes(8, "big"))
        mac.update(part)
    return mac.hexdigest().encode()


def control_headers(secret: bytes, topic: str, partition: int, key: bytes, value: bytes) -> list[tuple[str, bytes]]:
    """The headers a worker writes a control record with."""
    return [(CONTROL_SIG_HEADER, control_signature(secret, topic, partition, key, value))]


def header_value(headers: Iterable[Any] | None, name: str) -> bytes | None:
    """The first header ``name`` of a raw record (aiokafka gives a sequence of (str, bytes))."""
    if not headers:
        return None
    for item in headers:
        if isinstance(item, tuple | list) and len(item) == 2 and item[0] == name and isinstance(item[1], bytes):
            return item[1]
    return None


def verify_control(
    secrets: bytes | Sequence[bytes],
    topic: str,
    partition: int,
    key: bytes,
    value: bytes | None,
    headers: Iterable[Any] | None,
) -> str | None:
    """None when the record is a genuine control record for this partition, else why it is not.

    ``secrets``: one secret, or those of :func:`control_secrets` (any of them may have signed).
    """
    candidates = (secrets,) if isinstance(secrets, bytes) else tuple(secrets)
    if not any(candidates):
        return "no control secret configured"
    signature = header_value(headers, CONTROL_SIG_HEADER)
    if signature is None:
        return f"control record without a {CONTROL_SIG_HEADER} header"
    for secret in candidates:
        if secret and hmac.compare_digest(signature, control_signature(secret, topic, partition, key, value or b"")):
            return None
    return "control record with a bad signature (forged, or written for another partition or secret)"


@dataclass(frozen=True, slots=True)
class Tick:
    watermark: float


@dataclass(frozen=True, slots=True)
class ShedMarker:
    project_id: str
    mode: str  # one of SHED_MODES, or "ok" (no shedding)
    fraction: float


def parse_control(key: bytes, value: bytes | None) -> Tick | ShedMarker | str:
    """The control record's meaning, or why it has none. Never raises, whatever the bytes."""
    try:
        body = orjson.loads(value or b"{}")
    except orjson.JSONDecodeError:
        return "control record value is not JSON"
    if not isinstance(body, dict):
        return f"control record value is a JSON {type(body).__name__}, not an object"
    if key == TICK_KEY:
        watermark = body.get("watermark")
        if isinstance(watermark, bool) or not isinstance(watermark, int | float):
            return "tick without a numeric 'watermark'"
        try:
            watermark = float(watermark)
        except OverflowError:  # an int too large for a float
            return "tick with a non-finite 'watermark'"
        if not math.isfinite(watermark):
            return "tick with a non-finite 'watermark'"
        return Tick(watermark)
    if key == SHED_KEY:
        project_id, mode = body.get("project_id"), body.get("mode")
        if not isinstance(project_id, str):
            return "shed marker without a string 'project_id'"
        if mode not in (*SHED_MODES, NOT_SHED):
            mode = "ok"  # as before: an unknown mode lifts the route
        fraction = body.get("fraction", 1.0)
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            return "shed marker with a non-numeric 'fraction'"
        try:
            share = float(fraction)
        except OverflowError:
            share = math.inf
        if not math.isfinite(share):
            return "shed marker with a non-finite 'fraction'"
        return ShedMarker(project_id, mode, min(1.0, max(0.0, share)))
    return "unknown control record key"
