"""``streamapp produce``: send contract-following events straight to the events topic (the load
generator itself is :func:`streamapp.dev.produce_load`)."""

from __future__ import annotations

import argparse
import asyncio
import json

from streamapp.cli.command import Command
from streamapp.dev import produce_load
from streamapp.settings import Settings, SettingsError


def _produce_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", default=None, help="default: STREAMAPP_KAFKA_BOOTSTRAP")
    parser.add_argument("--topic", default=None, help="default: STREAMAPP_EVENTS_TOPIC")
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s in total (before spikes)")
    parser.add_argument("--projects", type=int, default=10)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1, help="events per Kafka record (batch form of the contract)")
    parser.add_argument("--spike", action="append", default=[], help="PROJECT:FACTOR:START_S:LENGTH_S")
    parser.add_argument("--collection", default="pageviews")


def parse_spike(text: str) -> tuple[str, float, float, float]:
    """``--spike PROJECT:FACTOR:START_S:LENGTH_S`` as a tuple; SettingsError (exit code 2) when malformed."""
    try:
        project, factor, start, length = text.split(":")
        return project, float(factor), float(start), float(length)
    except ValueError:
        raise SettingsError(f"--spike {text!r}: expected PROJECT:FACTOR:START_S:LENGTH_S") from None


# No docstring on purpose: its first line would become the command's line in `streamapp --help`,
# which has always been empty for produce.
def produce(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    spikes = [parse_spike(s) for s in args.spike]
    sent = asyncio.run(
        produce_load(
            args.bootstrap or settings.kafka_bootstrap,
            args.topic or settings.events_topic,
            rate=args.rate,
            projects=[f"project-{i}" for i in range(args.projects)],
            duration=args.duration,
            batch=args.batch,
            spikes=spikes,
            collection=args.collection,
        )
    )
    print(json.dumps(sent))
    return 0


PRODUCE_COMMAND = Command("produce", _produce_args, produce)
