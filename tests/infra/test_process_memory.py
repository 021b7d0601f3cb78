"""``limit_malloc_arenas``: set on glibc, and an operator's explicit MALLOC_ARENA_MAX wins;
``freeze_startup_heap``: a full collection no longer visits what the worker started with."""

from __future__ import annotations

import subprocess
import sys

import pytest

from streamapp.infra.process_memory import limit_malloc_arenas

FREEZE = """
import gc, time
import boto3, faust, aiokafka
import streamapp.sink.s3
from streamapp.infra.process_memory import freeze_startup_heap
boto3.client('s3', region_name='us-east-1', aws_access_key_id='x', aws_secret_access_key='y')

def full_collection_visits():
    started = time.perf_counter()
    gc.collect()
    return len(gc.get_objects()), time.perf_counter() - started

before, before_s = full_collection_visits()
frozen = freeze_startup_heap()
after, after_s = full_collection_visits()
print(before, frozen, after, round(before_s * 1000, 1), round(after_s * 1000, 1))
"""

CHECK = "from streamapp.infra.process_memory import limit_malloc_arenas as f; print(f())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_arena_cap_is_set_on_glibc_unless_the_environment_sets_one() -> None:
    assert limit_malloc_arenas() is True
    own = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    assert own.stdout.strip() == "True"
    explicit = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, env={"MALLOC_ARENA_MAX": "4"}
    )
    assert explicit.stdout.strip() == "False"


def test_the_startup_heap_is_frozen_out_of_full_collections() -> None:
    # In a process of its own: freezing is process-wide and the test process's heap is not a worker's.
    out = subprocess.run([sys.executable, "-c", FREEZE], capture_output=True, text=True, check=True).stdout.split()
    before, frozen, after = (int(v) for v in out[:3])
    print(f"\ntracked objects {before} -> {after} ({frozen} frozen); full collection {out[3]} -> {out[4]} ms")
    assert before > 50_000 and frozen >= before - 1_000
    assert after < before // 20
