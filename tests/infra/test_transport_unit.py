"""The transport's own rules: where a partition resumes after a seek, and bulk batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from faust.types import TP
from mode.utils.logging import CompositeLogger

from streamapp.infra.transport import (
    ACCEPT_GAP,
    DELIVER,
    MAX_RESEEKS,
    RESEEK,
    RecordBatch,
    StreamappConsumer,
    bulk_records,
    first_gap,
    resume_verdict,
)

EVENTS_0 = TP("events", 0)
EVENTS_1 = TP("events", 1)


@dataclass
class Record:
    offset: int


class FakeThread:
    def __init__(self, committed: dict[TP, int | None] | None = None) -> None:
        self.seeks: list[tuple[TP, int]] = []
        self.committed = committed or {}

    def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def seek_to_committed(self) -> dict[TP, int | None]:
        """As aiokafka: seeks only the partitions committed above 0."""
        for tp, offset in self.committed.items():
            if offset and offset > 0:
                self.seeks.append((tp, offset))
        return dict(self.committed)


def consumer() -> Any:
    """A StreamappConsumer with only the state its seek and resume rules use (no app, no broker)."""
    c: Any = object.__new__(StreamappConsumer)
    c._seek_seq = 0
    c._sought_seq = {}
    c._resume = {}
    c._next_offset = {}
    c._unsought = set()
    c._fetched_from = {}
    c._read_offset = {}
    c.stale_records_dropped = 0
    c._thread = FakeThread()
    c.log = CompositeLogger(logging.getLogger("test"))
    return c


def batch(first: int, n: int = 3) -> list[Record]:
    return [Record(first + i) for i in range(n)]


def test_verdicts() -> None:
    assert resume_verdict(100, 100, 0) == DELIVER
    assert resume_verdict(90, 100, 0) == DELIVER  # below the target: the rest is skipped as delivered
    assert resume_verdict(2192, 216, 0) == RESEEK
    assert resume_verdict(2192, 216, MAX_RESEEKS - 1) == RESEEK
    assert resume_verdict(2192, 216, MAX_RESEEKS) == ACCEPT_GAP


def test_batch_from_before_the_seek_is_dropped_and_sought_again() -> None:
    c = consumer()
    c._mark_sought(EVENTS_0, 216)
    c._mark_sought(EVENTS_1, 54)
    assert c._next_offset == {EVENTS_0: 216, EVENTS_1: 54}
    records = c._resumable({EVENTS_0: batch(2192), EVENTS_1: batch(54)})
    assert list(records) == [EVENTS_1], "partition 0's batch started past its target"
    assert c._thread.seeks == [(EVENTS_0, 216)]
    assert c.stale_records_dropped == 3
    assert c._resume == {EVENTS_0: [216, 1]}, "partition 1 resumed; partition 0 still waits"
    # The next batch starts at the target: delivered, and the partition no longer checked.
    records = {EVENTS_0: batch(216)}
    c._check_resume(records)
    assert list(records) == [EVENTS_0] and c._resume == {}
    records = {EVENTS_0: batch(5000)}
    c._check_resume(records)
    assert list(records) == [EVENTS_0], "only the first batch after a seek is checked"


def test_a_real_gap_is_accepted_after_the_reseeks() -> None:
    c = consumer()
    c._mark_sought(EVENTS_0, 10)
    for attempt in range(MAX_RESEEKS):
        records = {EVENTS_0: batch(20)}
        c._check_resume(records)
        assert records == {}, attempt
    records = {EVENTS_0: batch(20)}
    c._check_resume(records)
    assert list(records) == [EVENTS_0] and c._resume == {}
    assert len(c._thread.seeks) == MAX_RESEEKS


def test_a_bulk_batch_starting_past_the_next_offset_is_read_again() -> None:
    """Point 7: delivered up to 99, the next fetch of partition 0 starts at 103 (three records it
    never returned): dropped and sought back to 100; partition 1 and other topics are untouched."""
    c = consumer()
    overflow_0 = TP("overflow", 0)
    c._next_offset = {EVENTS_0: 100, EVENTS_1: 40, overflow_0: 7}
    fetched = {EVENTS_0: batch(103), EVENTS_1: batch(40), TP("other", 0): batch(900), overflow_0: batch(5)}
    c._check_continuity(fetched, {"events", "overflow"})
    records = c._resumable(fetched)
    assert list(records) == [EVENTS_1, TP("other", 0), overflow_0]
    assert c._thread.seeks == [(EVENTS_0, 100)]
    # The refetch starts where it should: delivered, and the partition is no longer held.
    fetched = {EVENTS_0: batch(100)}
    c._check_continuity(fetched, {"events"})
    assert list(c._resumable(fetched)) == [EVENTS_0] and c._resume == {}


def test_first_gap_finds_the_first_missing_offset() -> None:
    assert first_gap([]) is None
    assert first_gap(batch(7, 1)) is None
    assert first_gap(batch(100, 500)) is None
    assert first_gap([*batch(103, 4), *batch(10_100, 3)]) == 4
    assert first_gap([Record(1), Record(3), Record(4), Record(5)]) == 1  # span matches, offsets do not


def test_a_bulk_batch_with_missing_offsets_is_delivered_up_to_them_and_read_again() -> None:
    """Point 7 inside a batch: one fetch of partition 0 held offsets 103-106, then 10,100-10,102
    (a restart under load in the test suite; the records between never reached S3). Delivered:
    103-106; partition 0 sought to 107 and checked as after any seek; other partitions and
    non-bulk topics untouched."""
    c = consumer()
    c._next_offset = {EVENTS_0: 103, EVENTS_1: 40}
    other = TP("other", 0)
    fetched = {EVENTS_0: [*batch(103, 4), *batch(10_100)], EVENTS_1: batch(40), other: [Record(1), Record(9)]}
    records = c._cut_at_gaps(fetched, {"events"})
    assert [r.offset for r in records[EVENTS_0]] == [103, 104, 105, 106]
    assert records[EVENTS_1] == fetched[EVENTS_1] and records[other] == fetched[other]
    assert c._thread.seeks == [(EVENTS_0, 107)] and c._resume == {EVENTS_0: [107, 0]}
    assert c.stale_records_dropped == 3
    # The refetch starts past 107 again: dropped and sought back (the usual rule) ...
    refetch = {EVENTS_0: batch(10_100)}
    c._check_resume(refetch)
    assert refetch == {} and c._thread.seeks[-1] == (EVENTS_0, 107)
    # ... until it starts at 107: delivered.
    refetch = {EVENTS_0: batch(107)}
    c._check_resume(refetch)
    assert list(refetch) == [EVENTS_0] and c._resume == {}
    assert c._cut_at_gaps(refetch, {"events"}) is refetch, "a contiguous batch is passed through as is"


def test_seek_without_a_target_is_not_checked() -> None:
    c = consumer()
    c._mark_sought(EVENTS_0, 10)
    c._mark_sought(EVENTS_0, None)  # e.g. seek to the beginning: any first offset is right
    records = {EVENTS_0: batch(500)}
    c._check_resume(records)
    assert list(records) == [EVENTS_0] and c._next_offset == {}


def test_nothing_is_delivered_before_the_first_seek_of_an_assignment() -> None:
    c = consumer()
    c._unsought = {EVENTS_0, EVENTS_1}  # as on_partitions_assigned leaves it
    assert c._resumable({EVENTS_0: batch(5000), EVENTS_1: batch(7)}) == {}
    c._mark_sought(EVENTS_1, 7)
    assert list(c._resumable({EVENTS_0: batch(5000), EVENTS_1: batch(7)})) == [EVENTS_1]
    c._mark_sought(EVENTS_0, None)
    assert list(c._resumable({EVENTS_0: batch(5000)})) == [EVENTS_0]


async def test_a_partition_without_a_commit_is_read_from_where_its_fetch_started() -> None:
    """Records fetched before the first seek are dropped; with no commit to seek to, the
    partition goes back to the first of them (aiokafka would leave it past them: lost)."""
    c = consumer()
    fresh, committed_zero, untouched = TP("overflow", 0), TP("overflow", 1), TP("overflow", 2)
    c._unsought = {EVENTS_0, fresh, committed_zero, untouched}
    fetched = {EVENTS_0: batch(900), fresh: batch(0, 40), committed_zero: batch(0)}
    c._note_fetched(fetched)
    assert c._resumable(fetched) == {}
    c._note_fetched({fresh: batch(40, 40)})  # the fetcher went on; still nothing delivered
    c._thread = FakeThread({EVENTS_0: 216, fresh: None, committed_zero: 0, untouched: None})
    await c.seek_to_committed()
    assert sorted(c._thread.seeks) == sorted([(EVENTS_0, 216), (fresh, 0), (committed_zero, 0)])
    assert c._unsought == set(), "every partition may deliver now"
    assert c._fetched_from == {}, "a seek starts the record again"
    assert c._next_offset == {EVENTS_0: 216, fresh: 0, committed_zero: 0}


async def test_a_partition_kept_through_a_rebalance_resumes_after_its_last_delivery() -> None:
    c = consumer()
    c._mark_sought(EVENTS_0, None)  # uncommitted, nothing fetched: its position was kept
    c._note_fetched({EVENTS_0: batch(0, 10)})
    c._next_offset[EVENTS_0] = 6  # records 0-5 delivered, then the flow stopped for a rebalance
    c._unsought = {EVENTS_0}
    c._thread = FakeThread({EVENTS_0: None})
    await c.seek_to_committed()
    assert c._thread.seeks == [(EVENTS_0, 6)]


def test_a_hand_over_that_outlives_a_seek_does_not_move_the_partition_past_it() -> None:
    """A record handed to the agents while the partition is sought again (a full agent queue
    blocked the hand-over through a rebalance) must not set where the partition reads on."""
    c = consumer()
    c._mark_sought(EVENTS_0, 700)
    before = c._sought_seq.get(EVENTS_0)
    c._delivered(EVENTS_0, 700, before)  # no seek meanwhile: read on after it
    assert c._next_offset[EVENTS_0] == 701 and c._read_offset[EVENTS_0] == 700

    blocked = c._sought_seq.get(EVENTS_0)
    c._mark_sought(EVENTS_0, 753)  # the rebalance's seek to the commit, while offset 1,000 waits
    c._delivered(EVENTS_0, 1000, blocked)
    assert c._next_offset[EVENTS_0] == 753, "the seek's position stands"
    assert c._read_offset[EVENTS_0] == 700
    kept = bulk_records({EVENTS_0: [RawRecord(o) for o in range(753, 760)]}, {"events"}, c._next_offset)
    assert [r.offset for r in kept[EVENTS_0][0].value] == list(range(753, 760)), "nothing after the seek is skipped"

    c._sought_seq.pop(EVENTS_1, None)  # revoked (never sought again) while its hand-over waited
    c._delivered(EVENTS_1, 5, 3)
    assert EVENTS_1 not in c._next_offset


@dataclass
class RawRecord:
    offset: int
    topic: str = "events"
    partition: int = 0
    timestamp: int = 0
    timestamp_type: int = 0
    key: bytes | None = None
    value: bytes | None = b"x"


def test_bulk_records_make_one_record_per_partition_batch() -> None:
    other = TP("other", 0)
    records = {
        EVENTS_0: [RawRecord(o) for o in range(10, 15)],
        EVENTS_1: [RawRecord(o, partition=1) for o in range(3)],
        other: [RawRecord(o, topic="other") for o in range(4)],
    }
    out = bulk_records(records, {"events"}, {EVENTS_0: 12, EVENTS_1: 3})
    assert set(out) == {EVENTS_0, other}, "partition 1's records were all delivered already"
    (one,) = out[EVENTS_0]
    assert isinstance(one.value, RecordBatch)
    assert [r.offset for r in one.value] == [12, 13, 14], "records below the next offset are left out"
    assert (one.offset, one.partition, one.topic) == (14, 0, "events"), "Faust tracks the last offset"
    assert one.serialized_value_size == 3
    assert out[other] == records[other], "other topics are delivered record by record"
