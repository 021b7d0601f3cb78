"""Local table state (RocksDB) that is ahead of its changelog is rebuilt, not fatal.

A worker's RocksDB stores are a cache of the tables' changelog topics. When those topics are
recreated (a restarted in-memory dev broker, a cluster rebuilt, topics deleted by hand) the
stores remember offsets the new changelog never reached, and stock Faust stops the worker with
``ConsistencyError`` and a traceback: every restart meets it again. The changelog is the truth
(it is what another worker would recover from), so here the stale partitions are discarded
before recovery, with one log line, and recovered from the changelog like on a fresh machine.
``streamapp worker --reset-local-state`` discards all local state by hand.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from faust.tables import TableManager
from faust.tables.recovery import Recovery
from faust.types import TP

log = logging.getLogger(__name__)


def stale_partitions(persisted: dict[TP, int | None], highwaters: dict[TP, int | None]) -> dict[TP, tuple[int, int]]:
    """Partitions whose persisted offset (last applied) is not below the changelog's end.

    A consistent store has applied at most offset ``highwater - 1``. ``highwater`` None (unknown)
    is never called stale.
    """
    out: dict[TP, tuple[int, int]] = {}
    for tp, offset in persisted.items():
        end = highwaters.get(tp)
        if offset is not None and offset >= 0 and end is not None and offset >= end:
            out[tp] = (offset, end)
    return out


def discard_partition(store: Any, partition: int) -> bool:
    """Empty one partition of a RocksDB table store (data and persisted offset); False if not one."""
    dbs = getattr(store, "_dbs", None)
    if dbs is None or not hasattr(store, "_db_for_partition"):
        return False  # e.g. the memory store: it persists nothing
    db = store._db_for_partition(partition)
    for key in list(db.keys()):
        del db[key]
    index = getattr(store, "_key_index", None)
    if index is not None:
        for key in [k for k, p in index.items() if p == partition]:
            del index[key]
    return True


class StreamappRecovery(Recovery):
    async def _build_offsets(self, consumer: Any, tps: set[TP], destination: Counter[TP], title: str) -> None:
        await self._discard_stale(consumer, tps, destination, title)
        await super()._build_offsets(consumer, tps, destination, title)

    async def _discard_stale(self, consumer: Any, tps: set[TP], destination: Counter[TP], title: str) -> None:
        persisted = {tp: destination.get(tp) for tp in tps if destination.get(tp) is not None}
        if not persisted:
            return
        highwaters = dict(await consumer.highwaters(*persisted))
        stale = stale_partitions(persisted, highwaters)
        if not stale:
            return
        for tp in stale:
            table = self.tp_to_table.get(tp)
            if table is not None and discard_partition(table.data, tp.partition):
                destination[tp] = None  # type: ignore[assignment] - recover from the changelog's start
        log.error(
            "local table state in %s is ahead of its changelog (%s; the changelog topics were recreated "
            "or truncated, e.g. a restarted dev broker): discarded those %s partitions, rebuilding them "
            "from the changelog",
            self.app.conf.tabledir,
            ", ".join(f"{tp.topic}[{tp.partition}] applied {o} >= end {e}" for tp, (o, e) in sorted(stale.items())),
            title,
        )


class StreamappTableManager(TableManager):
    """Faust's table manager with :class:`StreamappRecovery`, and without the second it waits on start.

    Stock Faust sleeps 1 s before it fixes the tables' changelog subscription, for tables that
    modules define while the app starts. Every table of this app is declared by ``create_app``
    (``streamapp.tables``), before the worker starts, and a table declared later would fail
    loudly ("Too late to add tables"), so the wait only delayed every worker's first assignment
    by a second.
    """

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = StreamappRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


def reset_local_state(tabledir: str | Path) -> bool:
    """Delete every local table store (``streamapp worker --reset-local-state``); True if any existed."""
    path = Path(tabledir)
    if not path.exists():
        return False
    shutil.rmtree(path)
    return True
