"""The drain's export pool (``STREAMAPP_DRAIN_PROCESSES``): real spawned processes, no worker.

* What the pool exports is what the drain's loop exports: any diverted record (hostile heads and
  bodies, any JSON) gives the same chunks, bytes, dead letters and counts either way.
* A process killed mid-batch costs nothing: its records come back unexported, the drain exports
  them in its loop (same chunks), and the pool is replaced.
* The processes exit with the worker, however it ends (a SIGKILL included).
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
from hypothesis import given, settings
from hypothesis import strategies as st

from streamapp.contract import TICK_KEY
from streamapp.overflow.chunks import OverflowChunks
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
