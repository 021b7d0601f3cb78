"""``limit_malloc_arenas``: set on glibc, and an operator's explicit MALLOC_ARENA_MAX wins."""

from __future__ import annotations

import subprocess
import sys

import pytest

from streamapp.infra.process_memory import limit_malloc_arenas

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
