"""Where the operator commands that bypass the workers (project, quota, shed, unshed) find the
control topic: the ``--bootstrap``/``--topic`` arguments they share, and their defaults."""

from __future__ import annotations

import argparse

from streamapp.settings import Settings


def add_control_topic_args(parser: argparse.ArgumentParser) -> None:
    """``--bootstrap`` and ``--topic``: where the control topic is (defaults from the settings)."""
    parser.add_argument("--bootstrap", default=None, help="Kafka bootstrap (default $STREAMAPP_KAFKA_BOOTSTRAP)")
    parser.add_argument("--topic", default=None, help="control topic (default $STREAMAPP_EVENTS_TOPIC-control)")


def control_topic_target(args: argparse.Namespace) -> tuple[str, str]:
    """(Kafka bootstrap, control topic): ``--bootstrap``/``--topic``, else the settings' ones."""
    settings = Settings.from_env()
    return args.bootstrap or settings.kafka_bootstrap, args.topic or settings.topic_name("control")
