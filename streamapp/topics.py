"""Every topic of the app, declared once with its serialization.

All values are raw bytes: the hot paths decode with orjson in batches instead of
building a model object per event.
"""

from __future__ import annotations

from dataclasses import dataclass

import faust
from faust.serializers import codecs
from faust.types import TopicT

from streamapp.settings import Settings


class _PassThrough(codecs.Codec):
    """Values of bulk topics are RecordBatch objects built by the transport: leave them be."""

    def _loads(self, s: bytes) -> bytes:
        return s

    def _dumps(self, s: bytes) -> bytes:
        return s


codecs.register("streamapp-bulk", _PassThrough())


@dataclass(frozen=True)
class Topics:
    events: TopicT  # the event contract; its offsets are committed by the S3 sink
    invalid: TopicT  # dead letters: {"reason", "topic", "partition", "offset", "key", "value"}
    overflow: TopicT  # a shed project's excess, same partitioning as events; committed by the drain
    objects: TopicT  # one record per S3 object written ("object written" notifications)
    control: TopicT  # projects, quotas, shed overrides and shed states; tailed by every worker


def declare_topics(app: faust.App, settings: Settings) -> Topics:
    partitions = settings.topic_partitions

    def raw(name: str, **kwargs: object) -> TopicT:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw", **kwargs)

    # The events and overflow topics are read in bulk (see streamapp.infra.transport): each Faust event
    # is one fetched batch of a partition, a RecordBatch of raw records. For the overflow topic it
    # also keeps the paced drain from blocking everyone: Faust stops fetching a partition when its
    # agent's buffer is under pressure, but puts what was fetched already with a blocking put once
    # the buffer is full, which stalls the whole consumer (the real-time sink too). One item per
    # partition per fetch always fits in the headroom between "pressure" and "full".
    overflow_topic = settings.topic_name("overflow")
    app.bulk_topics = {settings.events_topic, overflow_topic}  # type: ignore[attr-defined]

    def bulk(name: str) -> TopicT:
        # acks=False: Faust never commits these; their owners commit once events are durable in S3.
        return app.topic(
            name,
            key_type=bytes,
            value_type=None,
            key_serializer="raw",
            value_serializer="streamapp-bulk",
            partitions=partitions,
            acks=False,
        )

    return Topics(
        events=bulk(settings.events_topic),
        invalid=raw(settings.topic_name("invalid"), partitions=partitions),
        overflow=bulk(overflow_topic),
        objects=raw(settings.topic_name("s3-objects"), partitions=partitions),
        control=raw(settings.topic_name("control"), partitions=1),
    )
