"""Process-wide memory settings of a worker process."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys

log = logging.getLogger(__name__)

#: glibc's ``mallopt`` parameter number for the arena limit (malloc.h: ``M_ARENA_MAX``).
M_ARENA_MAX = -8
WORKER_MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = WORKER_MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas; True if the cap was set.

    glibc gives threads that allocate concurrently arenas of their own (up to 8 per core), and
    memory freed into an arena stays there. A worker's S3 upload threads (32 by default) then
    hold RSS in proportion to the thread count rather than the data: a burst of 50,000 invented
    project ids grew RSS ~12 MB more with the default than with 2 arenas, the value commonly set
    for threaded Python services (``MALLOC_ARENA_MAX=2``). Only arenas created after the call are
    limited, so it runs before the worker starts its threads. An explicit ``MALLOC_ARENA_MAX`` in
    the environment wins; not glibc: nothing to do.
    """
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # musl and others: no mallopt arena setting
        log.debug("mallopt(M_ARENA_MAX) not available")
        return False


def freeze_startup_heap() -> int:
    """Move every object alive now out of the collector's reach; returns how many were moved.

    A full collection visits every tracked object, and a worker starts with 100,000-130,000
    (Faust, aiokafka, botocore's service models) that live as long as the process: one full
    collection over them alone took 150-250 ms here, a stall of the event loop every agent, timer
    and HTTP request shares. Frozen, they are never visited again (``gc.freeze``, meant for this);
    what the worker allocates afterwards is collected as before. Called once, at first start.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
