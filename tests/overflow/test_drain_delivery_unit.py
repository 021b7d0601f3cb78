"""How the overflow drain hands ready chunks to ``deliver`` (``OverflowDrain._deliver_ready``): in
groups of ``CHUNKS_PER_DELIVERY``, in order, one delivery of a partition at a time, each in the
background while the drain reads on (the next group waits for it), and a failure raised at the
next delivery of its partition. ``deliver`` itself (objects, checkpoint, commit) is replaced by a
recorder; exactly once across crashes is tests/overflow/test_drain.py's and the worker tests'.
Deliveries of different partitions take the pacer in turn (``OverflowDrain.pace``)."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest

from streamapp.metering import Pacer
from streamapp.overflow.drain import CHUNKS_PER_DELIVERY, OverflowDrain


class Chunks:
    """What ``_deliver_ready`` uses of ``OverflowChunks``: its ready chunks and dead letters."""

    def __init__(self, ready: list[int]) -> None:
        self.ready: list[Any] = list(ready)
        self.dead_letters: list[Any] = []


def _drain(chunks: Chunks, log: list[tuple[str, list[int]]], fail: set[int] | None = None) -> OverflowDrain:
    drain = object.__new__(OverflowDrain)  # no app, S3 or consumer: deliver is the recorder below
    drain.partitions = {0: chunks}  # type: ignore[dict-item]
    drain._delivering = {}
    drain.dead_lettered = 0
    drain.app = type("App", (), {"producer": None})()  # no dead letters here: never used
    drain.spawn = asyncio.ensure_future  # the worker's BackgroundTasks.spawn keeps and logs it

    async def deliver(batch: list[int], working_since: float | None = None) -> None:
        log.append(("start", batch))
        await asyncio.sleep(0.01)  # an S3 round trip
        if fail and batch[0] in fail:
            raise RuntimeError(f"delivery of {batch} failed")
        log.append(("end", batch))

    drain.deliver = deliver  # type: ignore[method-assign]
    return drain


def test_ready_chunks_go_in_whole_groups_in_order_one_delivery_at_a_time() -> None:
    log: list[tuple[str, list[int]]] = []
    chunks = Chunks(list(range(2 * CHUNKS_PER_DELIVERY + 1)))
    drain = _drain(chunks, log)

    async def run() -> None:
        await drain._deliver_ready(0, chunks, 0.0, whole=True)  # type: ignore[arg-type]
        assert chunks.ready == [2 * CHUNKS_PER_DELIVERY]  # the odd chunk waits for more
        assert 0 in drain._delivering  # the last group is still on its way: the drain reads on
        chunks.ready.append(2 * CHUNKS_PER_DELIVERY + 1)
        await drain._deliver_ready(0, chunks, 0.0)  # type: ignore[arg-type]
        await drain.delivered(0)

    asyncio.run(run())
    first, second = list(range(CHUNKS_PER_DELIVERY)), list(range(CHUNKS_PER_DELIVERY, 2 * CHUNKS_PER_DELIVERY))
    rest = [2 * CHUNKS_PER_DELIVERY, 2 * CHUNKS_PER_DELIVERY + 1]
    # each delivery ends before the next of its partition starts, in chunk order
    assert log == [("start", first), ("end", first), ("start", second), ("end", second), ("start", rest), ("end", rest)]
    assert chunks.ready == []


def test_a_failed_delivery_is_raised_at_the_next_one_and_nothing_after_it_goes() -> None:
    log: list[tuple[str, list[int]]] = []
    chunks = Chunks(list(range(2 * CHUNKS_PER_DELIVERY)))
    drain = _drain(chunks, log, fail={0})

    async def run() -> None:
        with pytest.raises(RuntimeError, match="failed"):
            await drain._deliver_ready(0, chunks, 0.0)  # type: ignore[arg-type]

    asyncio.run(run())
    assert log == [("start", list(range(CHUNKS_PER_DELIVERY)))]  # the second group never started


def test_a_partition_revoked_meanwhile_gets_no_more_deliveries() -> None:
    log: list[tuple[str, list[int]]] = []
    chunks = Chunks(list(range(2 * CHUNKS_PER_DELIVERY)))
    drain = _drain(chunks, log)

    async def run() -> None:
        first = asyncio.ensure_future(drain._deliver_ready(0, chunks, 0.0))  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the first group is on its way
        drain.partitions.pop(0)  # revoked: the new owner replays from the committed offset
        await first
        await drain.delivered(0)

    asyncio.run(run())
    assert log == [("start", list(range(CHUNKS_PER_DELIVERY))), ("end", list(range(CHUNKS_PER_DELIVERY)))]


def test_deliveries_of_several_partitions_take_the_pacer_in_turn() -> None:
    """Three partitions' deliveries waiting at once go one share apart, not all together when the
    first share ends: the drain as a whole keeps to its allowance."""
    drain = object.__new__(OverflowDrain)
    drain.pacer = Pacer(max_rate=1000.0)  # 100 events: a share of 0.1 s
    drain.paced_seconds = 0.0
    drain.settings = type("Settings", (), {"health_backlog_seconds": 1.0})()
    drain.sink_pressure = lambda: (0.0, False)  # type: ignore[method-assign]  # no real-time backlog: full allowance
    started: list[float] = []

    async def delivery(origin: float) -> None:
        await drain.pace(100)
        started.append(time.monotonic() - origin)

    async def run() -> None:
        origin = time.monotonic()
        await delivery(origin)  # the first goes at once
        await asyncio.gather(*(delivery(origin) for _ in range(3)))

    asyncio.run(run())
    assert started[0] < 0.05, started
    for before, after in itertools.pairwise(started):
        assert after - before >= 0.09, started  # a share (0.1 s) apart, less the clock's grain
    assert started[-1] >= 0.29, started


@pytest.mark.parametrize("idle", [True, False])
def test_a_drain_whose_sink_is_idle_forgets_the_backlog_it_saw(idle: bool) -> None:
    """The pacer remembers the worst backlog age of the last 5 s (an overloaded sink's age dips to 0
    as it writes its windows); once the sink has no open window and nothing unread, that memory
    only held the drain at its floor (~8 s after the replay's traffic stopped)."""
    drain = object.__new__(OverflowDrain)
    drain.pacer = Pacer(max_rate=1000.0)  # 100 events: 0.1 s at the full rate, 2 s at the 5 % floor
    drain.paced_seconds = 0.0
    drain.settings = type("Settings", (), {"health_backlog_seconds": 1.0})()
    pressure = [(3.0, False)]  # the sink 3 s behind: past the threshold
    drain.sink_pressure = lambda: pressure[0]  # type: ignore[method-assign]

    async def run() -> float:
        await drain.pace(100)  # the first delivery goes at once; the pacer has seen the backlog
        pressure[0] = (0.0, idle)  # the backlog is gone; the sink idle, or writing its windows
        started = time.monotonic()
        await drain.pace(100)
        return time.monotonic() - started

    waited = asyncio.run(run())
    if idle:
        assert waited < 0.5, waited  # its share at the full rate (0.1 s)
    else:
        assert waited >= 1.0, waited  # the remembered backlog: the floor rate
