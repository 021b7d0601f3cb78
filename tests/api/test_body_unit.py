"""Inflating a compressed request body (``streamapp.api.body.inflate``): what any valid stream gives
back, every refusal, the in-flight budget after any outcome, and that the event loop runs between
the steps (the reason the API inflates bodies itself: tests/api/test_api_hostile.py measures it
against a running worker)."""

from __future__ import annotations

import asyncio
import gzip
import os
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamapp.api import ApiError
from streamapp.api.body import (
    INFLATE_STEP_BYTES,
    JOIN_IN_THREAD_BYTES,
    MAX_COMPRESSION_RATIO,
    BodyBudget,
    inflate,
    join,
)

LIMIT = 1 << 20


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


COMPRESSORS = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,  # RFC 1950, as the standard says
    "deflate-raw": raw_deflate,  # RFC 1951, as some clients send it under "deflate"
}


def run(coro):
    return asyncio.run(coro)


@settings(max_examples=60, deadline=None)
@given(
    payload=st.binary(max_size=3 * INFLATE_STEP_BYTES) | st.builds(lambda n: b"{}" * n, st.integers(0, 100_000)),
    kind=st.sampled_from(sorted(COMPRESSORS)),
)
def test_any_stream_inflates_to_its_payload_and_holds_it_of_the_budget(payload: bytes, kind: str) -> None:
    budget = BodyBudget(8 * LIMIT)
    encoding = "deflate" if kind == "deflate-raw" else kind
    body, held = run(inflate(COMPRESSORS[kind](payload), encoding, LIMIT, budget))
    assert body == payload
    assert held == len(payload) == budget.used


@settings(max_examples=40, deadline=None)
@given(parts=st.lists(st.binary(max_size=2000), min_size=2, max_size=4))
def test_concatenated_gzip_members_are_one_body(parts: list[bytes]) -> None:
    body, _ = run(inflate(b"".join(gzip.compress(p) for p in parts), "gzip", LIMIT))
    assert body == b"".join(parts)


@settings(max_examples=80, deadline=None)
@given(
    payload=st.binary(min_size=1, max_size=4000),
    kind=st.sampled_from(["gzip", "deflate"]),
    cut=st.integers(1, 10_000),
    tail=st.binary(min_size=1, max_size=8).filter(lambda t: not t.startswith(b"\x1f\x8b")),
    damage=st.sampled_from(["truncate", "append", "flip"]),
)
def test_a_broken_stream_is_a_400_and_holds_nothing(
    payload: bytes, kind: str, cut: int, tail: bytes, damage: str
) -> None:
    good = COMPRESSORS[kind](payload)
    if damage == "truncate":
        bad = good[: len(good) - 1 - cut % len(good)]
    elif damage == "append":
        bad = good + tail
    else:  # a flipped byte in the stored checksum: the stream ends, its check fails
        bad = good[:-5] + bytes([good[-5] ^ 0xFF]) + good[-4:] if kind == "gzip" else good[:-1] + bytes([good[-1] ^ 1])
    budget = BodyBudget(8 * LIMIT)
    with pytest.raises(ApiError) as refused:
        run(inflate(bad, kind, LIMIT, budget))
    assert refused.value.status == 400, refused.value.body()
    assert budget.used == 0


def test_over_the_limit_once_decompressed_is_a_413_and_holds_nothing() -> None:
    budget = BodyBudget(8 * LIMIT)
    # ~30x: under the ratio limit, over the size limit
    rows = b",".join(b'"%07d abcdefghijklmnopqrstuvwxyz"' % i for i in range(LIMIT // 30))
    body = gzip.compress(b"[" + rows + b"]", 9)
    assert len(rows) > LIMIT and len(body) * MAX_COMPRESSION_RATIO > LIMIT
    with pytest.raises(ApiError) as refused:
        run(inflate(body, "gzip", LIMIT, budget))
    assert refused.value.status == 413 and "byte limit" in refused.value.body().decode()
    assert budget.used == 0


def test_a_bomb_is_refused_at_the_ratio_before_it_is_inflated_to_the_limit() -> None:
    bomb = gzip.compress(b" " * (50 * LIMIT), 9)  # ~1000:1, and under the size limit below
    budget = BodyBudget(100 * LIMIT)
    with pytest.raises(ApiError) as refused:
        run(inflate(bomb, "gzip", 100 * LIMIT, budget))
    assert refused.value.status == 413 and "expands more than" in refused.value.body().decode()
    assert budget.used == 0


def test_a_full_budget_is_a_503_and_the_bytes_held_so_far_are_released() -> None:
    budget = BodyBudget(4 * INFLATE_STEP_BYTES)
    assert budget.reserve(3 * INFLATE_STEP_BYTES)  # others' bodies
    payload = bytes(range(256)) * (8 * INFLATE_STEP_BYTES // 256)
    with pytest.raises(ApiError) as refused:
        run(inflate(zlib.compress(payload), "deflate", LIMIT, budget))
    assert refused.value.status == 503
    assert budget.used == 3 * INFLATE_STEP_BYTES


def test_the_event_loop_runs_between_the_steps_of_one_body() -> None:
    # ~2x compressible, and joined on the loop (under JOIN_IN_THREAD_BYTES): only the steps yield
    payload = b'{"a": "' + os.urandom(JOIN_IN_THREAD_BYTES // 2 - 64).hex().encode() + b'"}'
    body = zlib.compress(payload)

    async def inflate_while_ticking() -> tuple[bytes, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        ticks = 0
        out, _ = await inflate(body, "deflate", 8 * LIMIT)
        task.cancel()
        return out, ticks

    out, ticks = run(inflate_while_ticking())
    assert out == payload
    assert len(payload) < JOIN_IN_THREAD_BYTES
    assert ticks >= len(payload) // INFLATE_STEP_BYTES - 1  # about one tick per step


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, JOIN_IN_THREAD_BYTES // 2), max_size=5))
def test_join_gives_the_chunks_joined_whatever_their_sizes(sizes: list[int]) -> None:
    chunks = [bytes([i]) * n for i, n in enumerate(sizes)]
    assert run(join(chunks)) == b"".join(chunks)
