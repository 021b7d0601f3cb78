"""The drain's export pool (``STREAMAPP_DRAIN_PROCESSES``): real spawned processes, no worker.

* What the pool exports is what the drain's loop exports: any diverted record (hostile heads and
  bodies, any JSON) gives the same chunks, bytes, dead letters and counts either way.
* A process killed mid-batch costs nothing: its records come back unexported, the drain exports
  them in its loop (same chunks), and the pool is replaced.
* The processes exit with the worker, however it ends (a SIGKILL included).
* The drain's reading with the pool (one fetched batch exported ahead) hands ``deliver`` the same
  chunks as without it: forged records, re-sends and ticks among two partitions' batches.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from faust.types import TP
from hypothesis import given, settings
from hypothesis import strategies as st

import streamapp.overflow.chunks as chunks_module
from streamapp.contract import TICK_KEY
from streamapp.control import control_headers
from streamapp.overflow.chunks import OverflowChunks
from streamapp.overflow.drain import OverflowDrain
from streamapp.overflow.export import ExportLimits, RecordLines
from streamapp.overflow.pool import ExportPool, export_pool
from streamapp.replay.traffic import encode_events
from streamapp.settings import Settings
from streamapp.sink.diversions import DIVERTED_HEAD, overflow_record
from tests.overflow.test_raw_diversion_unit import ENVELOPE, HEADS, RECORDS, T0_MS, WINDOW, new_chunks

LIMITS = ExportLimits(WINDOW, max_record_bytes=100_000, max_event_bytes=2_000, max_future_seconds=3600)


def wait_usable(pool: ExportPool, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pool.usable():
        assert time.monotonic() < deadline, f"the pool did not start: {pool.status()}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pool() -> Iterator[ExportPool]:
    pool = ExportPool(2, LIMITS)
    wait_usable(pool)
    yield pool
    pool.close()


def outcome(chunks: OverflowChunks) -> dict[str, Any]:
    """Everything the drain takes from ``chunks``: its chunks' objects, dead letters and counts."""
    chunks.process(chunks.next_offset, TICK_KEY, b"{}")  # cut what is open
    return {
        "objects": [
            [(obj.key, bytes(obj.data), obj.events) for obj in chunk.objects] + [chunk.commit_offset, chunk.checkpoint]
            for chunk in chunks.ready
        ],
        "dead": [(source, item.offset, item.key, item.value, item.reason) for source, item in chunks.dead_letters],
        "counts": (chunks.invalid, chunks.untargeted, chunks.duplicates),
    }


def feed(values: list[tuple[bytes | None, bytes]], lines: list[RecordLines | None] | None = None) -> dict[str, Any]:
    chunks = new_chunks()
    for offset, (key, value) in enumerate(values):
        chunks.process(offset, key, value, lines[offset] if lines is not None else None)
    return outcome(chunks)


def diverted(key: bytes | None, head: dict[str, Any], body: bytes) -> tuple[bytes | None, bytes]:
    return key, DIVERTED_HEAD + orjson.dumps(head)[1:] + b"\n" + body


@settings(max_examples=60, deadline=None)
@given(
    records=st.lists(
        st.tuples(
            st.one_of(st.none(), st.sampled_from([b"p", b"victim", b"\xff"])),
            HEADS,
            st.one_of(ENVELOPE.map(orjson.dumps), st.binary(max_size=40)),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_the_pool_exports_any_diverted_record_as_the_drains_loop_does(
    pool: ExportPool, records: list[tuple[bytes | None, dict[str, Any], bytes]]
) -> None:
    values = [diverted(key, head, body) for key, head, body in records]
    values += values[:1]  # a re-send: a duplicate for the log's decisions, exported all the same
    lines = asyncio.run(pool.export(values))
    assert feed(values, lines) == feed(values)


def test_the_pool_exports_the_parity_records_with_their_add_ons_and_dead_letters(pool: ExportPool) -> None:
    values = [(b"p", overflow_record(2, offset, T0_MS, orjson.dumps(r))) for offset, r in enumerate(RECORDS)]
    lines = asyncio.run(pool.export(values))
    assert all(found is not None for found in lines)  # exported there, not handed back
    got = feed(values, lines)
    assert got == feed(values)
    assert got["dead"] and got["objects"]  # the parity records hold both kinds
    assert b'"parsed":{' in b"".join(data for chunk in got["objects"] for data, *_ in [o[1:] for o in chunk[:-2]])


def busy_records(n: int) -> list[tuple[bytes | None, bytes]]:
    """``n`` diverted records of 500 events with Keen's add-ons (~15 ms each to export)."""
    return [
        (
            b"p",
            overflow_record(
                2,
                offset,
                T0_MS,
                b'{"project_id":"p","collection":"c","events":['
                + encode_events(0, offset * 500, 500, T0_MS, addons=True)
                + b"]}",
            ),
        )
        for offset in range(n)
    ]


def test_a_process_killed_mid_batch_hands_its_records_back_and_the_pool_is_replaced() -> None:
    pool = ExportPool(2, ExportLimits(WINDOW, max_record_bytes=1 << 20, max_event_bytes=2_000))
    try:
        wait_usable(pool)
        values = busy_records(120)
        assert pool.executor is not None
        children = [process.pid for process in pool.executor._processes.values()]

        async def export_while_killing() -> list[RecordLines | None]:
            task = asyncio.ensure_future(pool.export(values))
            await asyncio.sleep(0.3)
            os.kill(children[0], signal.SIGKILL)
            return await task

        lines = asyncio.run(export_while_killing())
        assert any(found is None for found in lines), "the killed process's slice came back exported"
        assert pool.restarts == 1 and pool.fallbacks == sum(found is None for found in lines)
        # The drain exports the handed-back records in its loop: the same chunks as without a pool.
        chunks = OverflowChunks(
            "o", 2, window_seconds=WINDOW, max_events=1 << 30, max_bytes=1 << 30, target=lambda p: ("b", "pre")
        )
        with_pool = OverflowChunks(
            "o", 2, window_seconds=WINDOW, max_events=1 << 30, max_bytes=1 << 30, target=lambda p: ("b", "pre")
        )
        chunks.limits = with_pool.limits = pool.limits
        for offset, (key, value) in enumerate(values):
            chunks.process(offset, key, value)
            with_pool.process(offset, key, value, lines[offset])
        assert outcome(with_pool) == outcome(chunks)
        wait_usable(pool)  # the replacement starts and takes work again
        again = asyncio.run(pool.export(values[:4]))
        assert all(found is not None for found in again)
        assert {p.pid for p in pool.executor._processes.values()}.isdisjoint(children)
    finally:
        pool.close()


def test_the_pools_processes_exit_with_a_killed_worker(tmp_path: Any) -> None:
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            """
            import time
            from streamapp.overflow.export import ExportLimits
            from streamapp.overflow.pool import ExportPool

            if __name__ == "__main__":
                pool = ExportPool(2, ExportLimits(10))
                while not pool.usable():
                    time.sleep(0.05)
                print(*[p.pid for p in pool.executor._processes.values()], flush=True)
                time.sleep(60)
            """
        )
    )
    worker = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, cwd=os.getcwd())
    try:
        assert worker.stdout is not None
        children = [int(pid) for pid in worker.stdout.readline().split()]
        assert len(children) == 2
        assert all(alive(pid) for pid in children)
    finally:
        worker.kill()
        worker.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in children), "a pool process outlived its worker"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_the_pool_follows_the_settings() -> None:
    assert export_pool(Settings(drain_processes=0)) is None
    pool = export_pool(Settings(drain_processes=3, window_seconds=60, max_record_bytes=5_000))
    assert pool is not None and pool.processes == 3 and not pool.started  # started by the worker as it starts
    assert (pool.limits.window_seconds, pool.limits.max_record_bytes) == (60, 5_000)


# --------------------------------------------------------------------------- the drain's reading


class Message:
    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.tp = TP("events-overflow", partition)


class Fetched:
    """One fetched batch as the drain's agent hands it over (``event.message``, ``event.value``)."""

    def __init__(self, partition: int, records: list[Any]) -> None:
        self.message = Message(partition)
        self.value = records


def fetched_batches(secret: bytes, forged_every: int = 7) -> list[Fetched]:
    """Two overflow partitions' diverted records, interleaved batch by batch, every ``forged_every``-th
    record unsigned (read past), a re-send (a duplicate) and a tick that cuts a chunk."""
    batches = []
    offsets = {0: 0, 1: 0}
    for n in range(12):
        partition = n % 2
        records = []
        for i in range(3):
            offset = offsets[partition]
            offsets[partition] += 1
            source_offset = offset if i else max(0, offset - 3)  # the first of each batch a re-send, at times
            events = [{"n": n, "i": i, "keen": {"timestamp": iso_at(T0_MS / 1000 + n)}}] * (1 + i)
            value = overflow_record(
                partition, source_offset, T0_MS, orjson.dumps({"project_id": "p", "collection": "c", "events": events})
            )
            key = TICK_KEY if (n, i) == (5, 2) else b"p"
            if key == TICK_KEY:
                value = b"{}"
            headers = (
                [] if offset % forged_every == 6 else control_headers(secret, "events-overflow", partition, key, value)
            )
            records.append(ConsumerRecord(offset, key, value, headers))
        batches.append(Fetched(partition, records))
    return batches


def iso_at(seconds: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ConsumerRecord:
    def __init__(self, offset: int, key: bytes | None, value: bytes, headers: list[Any]) -> None:
        self.offset, self.key, self.value, self.headers = offset, key, value, headers


def drain_outcome(pool: ExportPool | None) -> list[Any]:
    """What a drain (``handle``, as the agent calls it, a take of all batches at once) hands to
    ``deliver``: every chunk's objects in order, with and without the pool."""
    secret = b"s3cret"
    drain = object.__new__(OverflowDrain)  # no app, S3 or consumer: deliver is the recorder below
    drain.topic = "events-overflow"
    drain._control_secrets = (secret,)
    drain.pool = pool
    drain.partitions = {p: new_chunks() for p in (0, 1)}
    for chunks in drain.partitions.values():
        chunks.max_events = 4  # small chunks: several deliveries
    drain._delivering = {}
    drain.dead_lettered = 0
    drain.last_record_at = {}
    drain.app = type("App", (), {"producer": type("Producer", (), {"send": lambda *a: asyncio.sleep(0)})()})()
    drain.spawn = asyncio.ensure_future
    drain.events_topic, drain.invalid_topic = "events", "events-invalid"
    delivered: list[Any] = []

    async def partition(tp: TP) -> OverflowChunks:
        return drain.partitions[tp.partition]

    async def deliver(batch: list[Any], working_since: float | None = None) -> None:
        delivered.extend(
            (chunk.partition, chunk.commit_offset, [(obj.key, bytes(obj.data)) for obj in chunk.objects])
            for chunk in batch
        )

    drain.partition = partition  # type: ignore[method-assign]
    drain.deliver = deliver  # type: ignore[method-assign]

    async def run() -> None:
        await drain.handle(fetched_batches(secret))  # type: ignore[arg-type]
        for p in (0, 1):
            await drain.delivered(p)

    asyncio.run(run())
    return delivered


def test_the_drain_reading_with_the_pool_one_batch_ahead_delivers_what_it_delivers_alone(
    pool: ExportPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    alone = drain_outcome(None)
    assert alone and sum(len(objects) for _, _, objects in alone) > 4
    in_loop: list[int] = []  # records the loop exported itself (lines missing or not this record's)
    export_record = chunks_module.export_record
    monkeypatch.setattr(chunks_module, "export_record", lambda *a: in_loop.append(a[2]) or export_record(*a))
    before = pool.exported
    assert drain_outcome(pool) == alone
    assert pool.exported > before and in_loop == []  # every line came from the pool, each its own record's
