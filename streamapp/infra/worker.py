"""The worker process's Faust ``Worker``: Faust's, without its terminal spinner.

Faust's worker keeps a progress spinner unless the log level is below WARN, and to spin it on
every log message it sets the root logger to DEBUG (its stderr handler keeps the chosen level).
At ``--loglevel warn`` or ``error`` every ``log.debug`` of every library then built a LogRecord
and walked the handlers: aiokafka logs each request it sends and receives, and in a replayed spike
that was 6 % of the worker's main thread (py-spy). Without the spinner the root logger stays at the
level asked for. ``create_app`` sets ``Worker=StreamappWorker``.
"""

from __future__ import annotations

from typing import Any

import faust


class StreamappWorker(faust.Worker):
    """``faust.Worker`` with no spinner, so the root logger keeps the worker's log level."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spinner = None
