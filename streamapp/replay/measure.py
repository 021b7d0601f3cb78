"""What the replay observes from outside the worker: S3 objects (first seen, then read) and shed states.

Delivery latency comes from the objects themselves: a watcher lists the bucket every
``poll`` seconds and records when each object key was first seen (its *visible* time); after the
traffic every object is read and each event's ``"x"`` (id) and ``"t"`` (event time) are taken
from its line. Nothing here asks the worker how far it got. The shed watcher polls ``GET /shed/``
only to shade the plots and time the detection; the calibration reads the sink's ``events_in`` counter
(``GET /sink/``) to time how fast the worker works through a backlog (:func:`sink_events_read`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamapp.web.client import get_json

KIND_ON_TIME, KIND_LATE, KIND_DELAYED = 0, 1, 2
KIND_NAMES = ("on_time", "late", "delayed")
_ID_AND_TIME = re.compile(rb'"x":(\d+),"t":(\d+)')


def object_kind(key: str) -> int:
    if key.endswith("-delayed.json.gz"):
        return KIND_DELAYED
    if key.endswith("-late.json.gz"):
        return KIND_LATE
    return KIND_ON_TIME


def is_event_object(key: str, prefix: str, exclude: tuple[str, ...] = ()) -> bool:
    """Objects with events (not manifests or checkpoints, nor those of the ``exclude`` projects)."""
    rest = key[len(prefix) + 1 :] if prefix else key
    return (
        key.endswith(".json.gz") and not rest.startswith("_") and not rest.startswith(tuple(p + "/" for p in exclude))
    )


def parse_object(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(ids, event times in ms) of the replay's events in one gzip object."""
    found = _ID_AND_TIME.findall(gzip.decompress(data))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = np.array(found, dtype=np.int64)
    return pairs[:, 0], pairs[:, 1]


@dataclass
class ObjectEvents:
    """Every replay event found in S3: id, event time (s), visible time (s), object kind."""

    ids: np.ndarray
    event_time: np.ndarray
    visible: np.ndarray
    kind: np.ndarray

    @property
    def project(self) -> np.ndarray:
        return self.ids >> 32


@dataclass
class S3Watcher:
    """Learns of the bucket's objects, each as soon as it is written; ``first_seen[key]`` is when
    it was first found in S3, an upper bound of its visible time (``visible_at``).

    Two ways in: the worker's notice of each object it wrote (``ObjectNotices`` calls ``noticed``,
    which asks S3 for the object at once: the time comes from S3's answer, not from the notice), and
    a listing every ``poll`` seconds in a thread, for anything whose notice never came (notices are
    at least once, and a worker killed between its PUT and its notice sends none). Listing every
    second instead took a third of a core between moto (~1,700 keys/s) and this process's XML
    parsing while the worker drained, ~14 % of the drain's rate on this machine. With
    ``local_clock`` (the embedded S3 server, on this machine's clock) the bound is tightened by the
    object's own ``LastModified``: whole seconds, so the object was written before ``LastModified + 1 s``.
    """

    client: Any
    bucket: str
    prefix: str
    poll: float = 5.0
    exclude: tuple[str, ...] = ()
    local_clock: bool = False
    first_seen: dict[str, float] = field(default_factory=dict)
    last_modified: dict[str, float] = field(default_factory=dict)
    read_keys: set[str] = field(default_factory=set)
    errors: int = 0
    found_by_notice: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="replay-s3-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.time()
            self.list_once()
            self._stop.wait(max(0.05, self.poll - (time.time() - started)))

    def list_once(self) -> None:
        """One listing; new keys get the time the listing answered (an upper bound of visibility).

        Project by project: the export prefix also holds the sink's manifests and checkpoints (more
        keys than the events' own objects in a replay) and the excluded projects', and moto serves a
        listing at ~1,700 keys/s, so listing all of them every second took a third of a core between
        moto and this process's XML parsing while the worker drained."""
        try:
            for prefix in self._project_prefixes():
                self._list(prefix)
        except Exception:  # noqa: BLE001 - a failed listing is retried at the next poll
            self.errors += 1

    def _project_prefixes(self) -> list[str]:
        """The key prefixes of the projects in the bucket (one level under ``prefix``), excluded ones left out."""
        root = self.prefix + "/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        out = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=root, Delimiter="/"):
            self._add(page)  # objects right under the prefix, if any
            for common in page.get("CommonPrefixes", []):
                name = common["Prefix"][len(root) :].rstrip("/")
                if not name.startswith("_") and name not in self.exclude:
                    out.append(common["Prefix"])
        return out

    def _list(self, prefix: str) -> None:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            self._add(page)

    def _add(self, page: dict[str, Any]) -> None:
        seen_at = time.time()
        for item in page.get("Contents", []):
            key = item["Key"]
            if key not in self.first_seen and is_event_object(key, self.prefix, self.exclude):
                self.first_seen[key] = seen_at
                self.last_modified[key] = item["LastModified"].timestamp()

    def noticed(self, key: str) -> None:
        """``key`` was written, says the worker: found in S3 now (HEAD), it is first seen now."""
        if key in self.first_seen or not is_event_object(key, self.prefix, self.exclude):
            return
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception:  # noqa: BLE001 - not there (parked elsewhere) or S3 failed: the listing finds it
            self.errors += 1
            return
        self.last_modified.setdefault(key, head["LastModified"].timestamp())
        if self.first_seen.setdefault(key, found := time.time()) == found:
            self.found_by_notice += 1

    def read_new(self) -> np.ndarray:
        """Read objects not read yet; returns the ids of the events they held."""
        added = []
        for key in list(self.first_seen):
            if key in self.read_keys:
                continue
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            ids, times = parse_object(body)
            self.read_keys.add(key)
            kind = np.full(len(ids), object_kind(key), np.int8)
            self._parts.append((ids, times / 1000.0, np.full(len(ids), self.visible_at(key)), kind))
            added.append(ids)
        return np.concatenate(added) if added else np.zeros(0, np.int64)

    def visible_at(self, key: str) -> float:
        """Latest time at which ``key`` can have become visible (see the class doc)."""
        seen = self.first_seen[key]
        modified = self.last_modified.get(key)
        return min(seen, modified + 1.0) if self.local_clock and modified is not None else seen

    def events(self) -> ObjectEvents:
        if not self._parts:
            empty = np.zeros(0)
            return ObjectEvents(empty.astype(np.int64), empty, empty, empty.astype(np.int8))
        ids, times, seen, kind = (np.concatenate(col) for col in zip(*self._parts, strict=True))
        return ObjectEvents(ids, times, seen, kind)

    def last_modified_resolution(self) -> float:
        """Smallest non-zero fractional part of LastModified: 0 means whole seconds only."""
        fractions = [t % 1 for t in self.last_modified.values()]
        return float(max(fractions, default=0.0))


class ObjectNotices:
    """Reads the worker's object notices (``{events topic}-s3-objects``, one record per object
    written, keyed by the object's key) in a thread and hands each key to ``on_key``."""

    def __init__(self, bootstrap: str, topic: str, on_key: Callable[[str], None]) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.on_key = on_key
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._consume()), name="replay-notices", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    async def _consume(self) -> None:
        from aiokafka import AIOKafkaConsumer  # ~0.3 s to import: only once a replay runs

        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
        )
        try:
            await consumer.start()
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    for record in records:
                        if record.key:
                            self.on_key(record.key.decode("utf-8", "replace"))
        except Exception:  # noqa: BLE001 - without notices the watcher's listing still finds every object
            self.errors += 1
        finally:
            with contextlib.suppress(Exception):  # also when it never started
                await consumer.stop()


@dataclass
class ShedWatcher:
    """Polls the worker's ``/shed/`` view: (time, shed project ids) samples."""

    web: str
    poll: float = 0.5
    samples: list[tuple[float, list[str]]] = field(default_factory=list)
    #: project -> the meter's own decision times (``since`` of its shed states), seen so far.
    since: dict[str, set[float]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="replay-shed-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            body = worker_view(self.web, "/shed/")
            if isinstance(body, dict):
                shed = [s["project_id"] for s in body.get("shed", []) if isinstance(s.get("project_id"), str)]
                for state in body.get("shed", []):
                    if isinstance(state.get("since"), int | float):
                        self.since.setdefault(str(state.get("project_id")), set()).add(float(state["since"]))
                self.samples.append((time.time(), shed))
            self._stop.wait(self.poll)

    def decisions(self, project: str) -> list[float]:
        """When the meter decided to shed ``project`` (its clock), each episode once."""
        return sorted(self.since.get(project, ()))

    def periods(self, project: str) -> list[tuple[float, float]]:
        """Intervals during which ``project`` was seen shed (by this poller's clock)."""
        out: list[tuple[float, float]] = []
        start: float | None = None
        last = 0.0
        for t, shed in self.samples:
            if project in shed and start is None:
                start = t
            elif project not in shed and start is not None:
                out.append((start, t))
                start = None
            last = t
        if start is not None:
            out.append((start, last))
        return out


def worker_view(web: str, path: str) -> Any:
    """The JSON of one of the worker's views (``GET web + path``), or None if it does not answer."""
    try:
        return get_json(f"{web}{path}", timeout=5)
    except (OSError, ValueError):
        return None


def sink_events_read(web: str) -> int | None:
    """Events the worker's S3 sink has read so far (``GET /sink/``), or None if it does not answer."""
    body = worker_view(web, "/sink/")
    value = body.get("events_in") if isinstance(body, dict) else None
    return value if isinstance(value, int) else None


#: How often ``settle`` reads the objects found since its last round: a round with nothing new costs
#: a few milliseconds, and the replay's last phase ends this much after its last object at most.
SETTLE_POLL_SECONDS = 0.25


def settle(
    watcher: S3Watcher,
    accepted_ids: np.ndarray,
    deadline: float,
    on_progress: Callable[[int, int], None] = lambda found, total: None,
) -> bool:
    """Read objects until every accepted id is in S3 or ``deadline`` (epoch) passes.

    Each round marks only the ids of the objects read in it (a sorted search into the accepted
    ones): testing all ids found so far against all accepted ones every second took the replay
    a third of a core while the worker drained a million diverted events."""
    wanted = np.unique(accepted_ids)
    found = np.zeros(len(wanted), bool)
    while True:
        new = watcher.read_new()
        if len(new) and len(wanted):
            at = np.searchsorted(wanted, new)
            inside = at < len(wanted)
            at = at[inside]
            found[at[wanted[at] == new[inside]]] = True
        count = int(found.sum())
        on_progress(count, len(wanted))
        if count >= len(wanted) or time.time() >= deadline:
            return count >= len(wanted)
        time.sleep(SETTLE_POLL_SECONDS)
