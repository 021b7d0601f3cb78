"""The meter's changelogged tables: per-project rate rings and shed states.

Both tables live on RocksDB (the app's ``store``, ``rocksdb://`` by default, through
rocksdict), are keyed by the project id (raw bytes) and have the events topic's
partition count: a project's table row sits in the partition its events come from,
so the worker that owns the events partition owns the row, and a restarted or
rebalanced worker recovers the rows from the changelog topics before its agents
resume.

* ``meter-rates``: ``{"p": partition, "o": last counted offset, "n": events, "b": bytes,
  "c": SecondCounts.to_dict()}``; written at most once per project per second, never per event.
* ``meter-shed``: ``{"p": partition, "s": ShedState.to_dict(), "m": [mode, fraction] | None,
  "k": peak events/s of the episode}``; written only when the state or the shed marker
  in force changes.

Writing a Faust table needs a *current event*: the table and the RocksDB store take
the partition of the changelog record (and of the local database) from it. Rows are
written at most once a second, from the agent, its 1 s timer or its flusher task, and
the timer and the task have no current event at all. So writes go
through :class:`PartitionContext`, which sets Faust's current-event context variable to
a stand-in event of the events topic and the project's partition for the duration of
the write; that is exactly the information Faust reads from it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import faust
import orjson
from faust.streams import _current_event
from faust.types import Message, TableT

from streamapp.metering import SecondCounts, ShedState
from streamapp.settings import Settings

RATES_TABLE = "meter-rates"
STATES_TABLE = "meter-shed"


@dataclass(frozen=True)
class MeterTables:
    rates: TableT
    states: TableT


def rocksdb_options() -> dict[str, Any]:
    """Small RocksDB buffers: one row per project (Faust's defaults are sized for big tables:
    a 2 GiB block cache and 3 x 64 MiB write buffers per partition database)."""
    return {
        "write_buffer_size": 4 * 1024 * 1024,
        "max_write_buffer_number": 2,
        "target_file_size_base": 8 * 1024 * 1024,
        "block_cache_size": 8 * 1024 * 1024,
        "block_cache_compressed_size": 4 * 1024 * 1024,
    }


def declare_tables(app: faust.App, settings: Settings) -> MeterTables:
    def table(name: str, help: str) -> TableT:
        return app.Table(
            name,
            partitions=settings.topic_partitions,  # co-partitioned with the events topic
            key_type=bytes,
            value_type=bytes,
            help=help,
            options=rocksdb_options(),  # a dict per table: Faust's store pops keys from it
        )

    return MeterTables(
        rates=table(RATES_TABLE, "Per-project per-second events/bytes ring (SecondCounts)"),
        states=table(STATES_TABLE, "Per-project shed state and the shed marker in force"),
    )


class PartitionContext:
    """``with ctx(partition): table[key] = value``: a Faust table write pinned to a partition."""

    def __init__(self, app: faust.App, topic: str) -> None:
        self.app = app
        self.topic = topic
        self._events: dict[int, Any] = {}  # strong refs: the context var holds a weakref

    def event(self, partition: int) -> Any:
        event = self._events.get(partition)
        if event is None:
            message = Message(
                topic=self.topic,
                partition=partition,
                offset=-1,
                timestamp=0.0,
                timestamp_type=0,
                headers=None,
                key=None,
                value=None,
                checksum=None,
            )
            event = self._events[partition] = self.app.create_event(None, None, None, message)
        return event

    @contextlib.contextmanager
    def __call__(self, partition: int) -> Iterator[None]:
        token = _current_event.set(weakref.ref(self.event(partition)))
        try:
            yield
        finally:
            _current_event.reset(token)


# ------------------------------------------------------------------ rows


@dataclass(slots=True)
class RatesRow:
    partition: int
    offset: int  # last events-topic offset counted into ``counts`` (replay guard)
    received: int
    nbytes: int
    counts: SecondCounts


@dataclass(slots=True)
class StateRow:
    partition: int
    state: ShedState
    marker: tuple[str, float] | None  # route of the last shed marker written, None = "ok"
    peak_eps: float


def encode_rates(row: RatesRow) -> bytes:
    return orjson.dumps(
        {"p": row.partition, "o": row.offset, "n": row.received, "b": row.nbytes, "c": row.counts.to_dict()}
    )


def decode_rates(value: bytes) -> RatesRow:
    d = orjson.loads(value)
    return RatesRow(int(d["p"]), int(d["o"]), int(d.get("n", 0)), int(d.get("b", 0)), SecondCounts.from_dict(d["c"]))


def encode_state(row: StateRow) -> bytes:
    marker = list(row.marker) if row.marker is not None else None
    return orjson.dumps({"p": row.partition, "s": row.state.to_dict(), "m": marker, "k": row.peak_eps})


def decode_state(value: bytes) -> StateRow:
    d = orjson.loads(value)
    marker = d.get("m")
    return StateRow(
        int(d["p"]),
        ShedState.from_dict(d["s"]),
        (str(marker[0]), float(marker[1])) if marker else None,
        float(d.get("k", 0.0)),
    )


def write_rows(table: TableT, ctx: PartitionContext, rows: list[tuple[int, bytes, bytes]]) -> None:
    """Write ``(partition, key, value)`` rows: one RocksDB put and one changelog record each."""
    for partition, key, value in rows:
        with ctx(partition):
            table[key] = value


def read_rows(table: TableT) -> Iterator[tuple[bytes, bytes]]:
    """Every row of the partitions this worker actively owns."""
    yield from table.items()
