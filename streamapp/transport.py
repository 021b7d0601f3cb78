"""Kafka transport for streamapp: Faust's aiokafka transport with two changes.

1. A faster fetch loop. Stock Faust wraps every record in
   ``wait_first(callback(message), suspend_flow.wait())``: two tasks per record,
   which caps a bare agent at ~12-14k records/s on this class of machine while
   its loop idles. While the flow is active we await the callback directly; the
   ``wait_first`` form is kept for when the flow is suspended (rebalance), which
   is the only time it is needed.
2. Offsets of topics whose acks are disabled are committed by their owner (the
   S3 sink, the overflow drain) through :meth:`StreamappConsumer.commit_offsets`,
   only once the events below the offset are durable in S3.
Selected by the ``streamapp://`` broker URL scheme (see ``Settings.broker_url``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers.aiokafka import Consumer, Transport
from faust.types import TP
from mode import Service

TRANSPORTS.aliases.setdefault("streamapp", "streamapp.transport:StreamappTransport")


class StreamappConsumer(Consumer):
    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        """End offsets, checked against a fetch.

        Tansu (the embedded broker) answers ListOffsets with the last record *batch's* base
        offset + 1, while a fetch reports the true high watermark. Table recovery compares the
        offsets it persisted in RocksDB against these, so after a crash a short answer made the
        worker refuse to start ("persisted offset is higher than the highwater"). Taking the
        larger of the two is right on any broker.
        """
        listed = dict(await super().highwaters(*partitions))
        probe = [tp for tp in partitions if (listed.get(tp) or 0) > 0]
        if not probe:
            return listed
        client = AIOKafkaConsumer(
            bootstrap_servers=[f"{url.host}:{url.port or 9092}" for url in self.app.conf.broker],
            group_id=None,
            enable_auto_commit=False,
            max_partition_fetch_bytes=1024,
        )
        await client.start()
        try:
            client.assign([TopicPartition(tp.topic, tp.partition) for tp in probe])
            for tp in probe:
                client.seek(TopicPartition(tp.topic, tp.partition), max(0, listed[tp] - 1))
            await client.getmany(timeout_ms=2000)
            for tp in probe:
                fetched = client.highwater(TopicPartition(tp.topic, tp.partition))
                if fetched is not None and fetched > listed[tp]:
                    listed[tp] = fetched
        finally:
            await client.stop()
        return listed

    async def commit_offsets(self, offsets: Mapping[TP, int]) -> bool:
        """Commit ``offsets`` (next offset to read) for partitions still assigned."""
        assigned = self.assignment()
        mine = {tp: off for tp, off in offsets.items() if tp in assigned}
        if not mine:
            return False
        did = await self._commit(mine)
        if did:
            self._committed_offset.update(mine)
            self.app.monitor.on_tp_commit(mine)
        return bool(did)

    async def committed_offsets(self, tps: list[TP]) -> dict[TP, int | None]:
        """Offsets committed by this group for ``tps`` (None where nothing is committed)."""
        thread = cast(Any, self)._thread

        async def fetch() -> dict[TP, int | None]:
            client = thread._ensure_consumer()
            found = await client._coordinator.fetch_committed_offsets(
                [TopicPartition(tp.topic, tp.partition) for tp in tps]
            )
            result: dict[TP, int | None] = {}
            for tp in tps:
                meta = found.get(TopicPartition(tp.topic, tp.partition))
                result[tp] = meta.offset if meta is not None and meta.offset >= 0 else None
            return result

        return cast(dict[TP, int | None], await thread.call_thread(fetch))

    async def _drain_messages(self, fetcher: Service) -> None:  # pragma: no cover - exercised end to end
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        acks_enabled_for = self.app.topics.acks_enabled_for
        commit_every = self._commit_every
        sleep = asyncio.sleep
        yield_every = 100
        num_since_yield = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                ait = cast(AsyncIterator, getmany(timeout=1.0))
                await sleep(0)
                if self.should_stop:
                    continue
                async for tp, message in ait:
                    num_since_yield += 1
                    if num_since_yield > yield_every:
                        await sleep(0)
                        num_since_yield = 0
                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is not None and offset < r_offset:
                        continue  # already delivered before a seek
                    gap = offset - (r_offset or 0)
                    if gap > 1 and r_offset and acks_enabled_for(message.topic):
                        await self._add_gap(tp, r_offset + 1, offset)
                    if commit_every is not None and self._n_acked >= commit_every:
                        self._n_acked = 0
                        await self.commit()
                    if self.flow_active:
                        await callback(message)
                    else:
                        await self.wait_first(callback(message), self.suspend_flow.wait())
                    set_read_offset(tp, offset)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise


class StreamappTransport(Transport):
    Consumer = StreamappConsumer
