"""The worker keeps the log level it was given: Faust's terminal spinner set the root logger to
DEBUG at ``--loglevel warn`` or above, so every library's debug call built a record
(``streamapp.infra.worker``)."""

from __future__ import annotations

import logging

import faust
import pytest

from streamapp.infra.worker import StreamappWorker


def root_logger_after_setup(worker_class: type[faust.Worker], level: int) -> logging.Logger:
    """What the worker's root-logger setup does to a logger with one stderr handler."""
    app = faust.App("logging-test", web_enabled=False)
    worker = worker_class(app, loglevel=level)
    logger = logging.Logger("root-stand-in", level)
    logger.addHandler(logging.StreamHandler())
    worker.on_setup_root_logger(logger, level)
    return logger


@pytest.mark.parametrize("level", [logging.WARNING, logging.ERROR])
def test_the_worker_keeps_its_log_level(level: int) -> None:
    logger = root_logger_after_setup(StreamappWorker, level)
    assert logger.level == level
    assert not logger.isEnabledFor(logging.DEBUG)
    assert len(logger.handlers) == 1


def test_fausts_own_worker_sets_debug_at_warn_which_is_why_ours_differs() -> None:
    """Pins the Faust behaviour the subclass exists for: should Faust stop doing it, the
    subclass can go."""
    logger = root_logger_after_setup(faust.Worker, logging.WARNING)
    assert logger.level == logging.DEBUG
