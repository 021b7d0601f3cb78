"""The sink's watermark ticks into idle partitions (``S3Sink.tick_idle_partitions``), on a fake clock
and consumer: control records (its own ticks, shed markers) are not activity, and an idle
partition is ticked as soon as its oldest open window may close, once per close.

Why it matters: the last window of a burst is written by a tick. When the tick itself counted as
activity, an idle partition was ticked only every idle flush plus a timer interval, so that window
was written up to twice the idle flush late, and the overflow drain, paced by the real-time
backlog, read that as a backlog (the replay's drain sat at its floor for 5-9 s after the traffic).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from streamapp.contract import TICK_KEY
from streamapp.control import control_headers, control_secrets
from tests.sink.test_record_isolation_unit import LATENESS, T0, WINDOW, new_sink

IDLE_FLUSH = 10.0  # Settings' default, which ``new_sink`` keeps


class Clock:
    """``time.monotonic`` and ``time.time`` of the sink module, moved by the test."""

    def __init__(self, wall: float) -> None:
        self.mono = 1000.0
        self.wall = wall

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


class Consumer:
    def __init__(self) -> None:
        self.highwaters: dict[int, int] = {}

    def assignment(self) -> set[Any]:
        return set()  # partition 0 is open already; no unopened partition to tick

    def highwater(self, tp: Any) -> int | None:
        return self.highwaters.get(tp.partition)


def _sink(monkeypatch: Any, clock: Clock) -> tuple[Any, list[int]]:
    import streamapp.sink.service as service

    monkeypatch.setattr(service, "time", clock)
    sink, _ = new_sink()
    sink.app.consumer = Consumer()
    sink._control_secrets = control_secrets("ab" * 32)
    sink._control_secret = sink._control_secrets[0]
    sent: list[int] = []

    async def send_tick(partition: int) -> None:
        sent.append(partition)

    sink._send_tick = send_tick  # type: ignore[method-assign]
    return sink, sent


def _event(offset: int, seconds: float) -> tuple[int, int, bytes, bytes]:
    value = orjson.dumps({"project_id": "p", "collection": "c", "event": {"keen": {"timestamp": seconds}}})
    return offset, int(seconds * 1000), b"p", value


def _read_tick(sink: Any, offset: int, watermark: float) -> None:
    """The tick record as the sink reads it back from the log (signed, as its own are)."""
    value = orjson.dumps({"watermark": watermark})
    headers = control_headers(sink._control_secret, sink.topic, 0, TICK_KEY, value)
    sink._control(sink.partitions[0], offset, TICK_KEY, value, headers)


def test_the_sinks_own_ticks_do_not_keep_an_idle_partition_busy(monkeypatch: Any) -> None:
    clock = Clock(T0 + 2.0)
    sink, sent = _sink(monkeypatch, clock)
    windows = sink.partitions[0]
    for offset in range(5):
        windows.process(*_event(offset, T0 + 1.0))
    tick = asyncio.run
    tick(sink.tick_idle_partitions())
    assert sent == []  # events were just read
    clock.advance(IDLE_FLUSH)
    tick(sink.tick_idle_partitions())
    assert sent == [0]  # idle for the idle flush: ticked
    _read_tick(sink, 5, clock.wall)
    assert sink.status[0].control_read == 1
    _read_tick(sink, 5, clock.wall)  # a redelivery is not counted again
    assert sink.status[0].control_read == 1
    clock.advance(IDLE_FLUSH)
    tick(sink.tick_idle_partitions())
    assert sent == [0, 0]  # its own tick read back did not count as activity: ticked again
    windows.process(*_event(6, clock.wall))  # an event: activity again
    clock.advance(1.0)
    tick(sink.tick_idle_partitions())
    assert sent == [0, 0]


def test_an_idle_partition_is_ticked_as_soon_as_its_oldest_window_may_close(monkeypatch: Any) -> None:
    clock = Clock(T0 + 1.0)
    sink, sent = _sink(monkeypatch, clock)
    windows = sink.partitions[0]
    windows.process(*_event(0, T0 + 1.0))
    close = windows.next_close
    assert close == T0 + WINDOW + LATENESS  # the window [T0, T0 + WINDOW) and its lateness
    asyncio.run(sink.tick_idle_partitions())  # the look that sees the event
    clock.advance(IDLE_FLUSH)  # idle, and ticked once
    asyncio.run(sink.tick_idle_partitions())
    assert sent == [0]
    _read_tick(sink, 1, clock.wall)
    assert windows.next_close == close  # that tick was before the close: the window is open
    clock.wall = close - 0.1
    clock.mono += 0.5  # the next timer, well within the idle flush of the last tick
    asyncio.run(sink.tick_idle_partitions())
    assert sent == [0]  # nothing to close yet
    clock.wall = close + 0.1
    clock.mono += 0.5
    asyncio.run(sink.tick_idle_partitions())
    assert sent == [0, 0]  # the window may close: ticked at once, not an idle flush later
    clock.mono += 0.5
    asyncio.run(sink.tick_idle_partitions())
    assert sent == [0, 0]  # that tick is on its way: not sent twice for the same close
    _read_tick(sink, 2, close + 0.1)
    assert windows.next_close == float("inf")  # closed by it
    assert [obj.key for obj in windows.outbox]  # and its object is out


def test_a_partition_behind_its_log_is_not_ticked(monkeypatch: Any) -> None:
    """Records not read yet will move the watermark: a tick would make them late."""
    clock = Clock(T0 + 1.0)
    sink, sent = _sink(monkeypatch, clock)
    sink.partitions[0].process(*_event(0, T0 + 1.0))
    sink.app.consumer.highwaters[0] = 5
    clock.advance(WINDOW + LATENESS + IDLE_FLUSH)
    asyncio.run(sink.tick_idle_partitions())
    assert sent == []
