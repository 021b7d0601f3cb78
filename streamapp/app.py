"""The Faust app: ``faust -A streamapp.app worker`` and ``streamapp worker`` run this.

``create_app(settings)`` builds a fully wired app: topics (``streamapp.topics``), the worker's
services (``streamapp.wiring.build_services``), its agents and its HTTP routes; the
module-level ``app`` is built from ``STREAMAPP_*`` environment variables.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import faust

import streamapp.infra.transport  # noqa: F401 - registers the streamapp:// broker scheme
import streamapp.infra.web_server  # noqa: F401 - registers the streamapp:// web driver
from streamapp.infra.local_state import StreamappTableManager
from streamapp.infra.process_memory import freeze_startup_heap, limit_malloc_arenas
from streamapp.infra.worker import StreamappWorker
from streamapp.settings import ENV_PREFIX, Settings, SettingsError
from streamapp.topics import declare_topics
from streamapp.wiring import WorkerServices, build_services, register_agents, register_routes

log = logging.getLogger(__name__)
NO_SECRET = (
    f"{ENV_PREFIX}CONTROL_SECRET is not set: a worker needs the cluster secret that signs control records "
    "(watermark ticks, shed markers); give every worker of the cluster the same random value, "
    "e.g. `python -c 'import secrets; print(secrets.token_hex(32))'` (`streamapp dev` makes one)"
)


class StreamappApp(faust.App):
    """``faust.App`` plus ``before_consumer_stop``: callbacks run when a worker shuts down, before
    Faust revokes the partitions and stops the tables (its ``on_before_shutdown`` signal comes
    after that, too late for a last table write)."""

    def __init__(self, *args: Any, streamapp_settings: Settings | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streamapp_settings = streamapp_settings  # None: an app built by hand (benchmarks)
        self.before_consumer_stop: list[Callable[[], None]] = []
        self.services: WorkerServices | None = None  # set once by create_app, right after this

    async def on_first_start(self) -> None:
        # Refuse to run without the secret (`faust -A streamapp.app worker` too): a worker without
        # one could not sign its ticks and markers, and would refuse everyone else's.
        settings = self.streamapp_settings
        if settings is not None and not settings.control_secret:
            log.error(NO_SECRET)
            raise SettingsError(NO_SECRET)
        limit_malloc_arenas()  # before the S3 upload threads start
        await super().on_first_start()
        log.info("froze %d objects of the startup heap out of the collector's way", freeze_startup_heap())

    async def _stop_consumer(self) -> None:
        for callback in self.before_consumer_stop:
            callback()
        await super()._stop_consumer()


def data_dir(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """Where local state lives: an explicit ``STREAMAPP_DATA_DIR`` (or a non-default setting) wins,
    then ``faust --datadir`` (Faust passes it on as ``F_DATADIR``/``FAUST_DATADIR``), then the default."""
    env = os.environ if environ is None else environ
    if ENV_PREFIX + "DATA_DIR" in env or settings.data_dir != Settings.data_dir:
        return settings.data_dir
    return env.get("F_DATADIR") or env.get("FAUST_DATADIR") or settings.data_dir


def accept_worker_datadir() -> None:
    """Let ``faust -A streamapp.app worker --datadir D`` through Faust's command-line parser.

    Faust takes ``--datadir`` only before the command name and rejects it after. Its package
    init reads ``--datadir`` from anywhere in argv into ``FAUST_DATADIR`` (which :func:`data_dir`
    honours), and ``faust -A`` imports this module before it parses the worker's options, so
    the worker command only has to accept the option.
    """
    import click
    from faust.cli.base import cli

    worker = cli.commands.get("worker")
    if isinstance(worker, click.Command) and not any("--datadir" in p.opts for p in worker.params):
        worker.params.append(
            click.Option(["--datadir"], default=None, expose_value=False, help="Directory to keep application state.")
        )


def create_app(settings: Settings | None = None) -> StreamappApp:
    settings = settings or Settings.from_env()
    app = StreamappApp(
        settings.app_id,
        streamapp_settings=settings,
        broker=settings.broker_url,
        store=settings.store,
        datadir=data_dir(settings),
        Worker=StreamappWorker,  # no terminal spinner: it set the root logger to DEBUG (infra.worker)
        TableManager=StreamappTableManager,  # rebuilds local state that is ahead of its changelog
        # Faust reads its own settings from the environment too; a private prefix keeps a stray
        # WEB_PORT or BROKER from silently changing the app.
        env_prefix="STREAMAPP_FAUST_",
        web_enabled=True,
        web="streamapp://",  # request bodies are inflated by the API, in steps (infra.web_server)
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        web_tables_enabled=False,  # raw table dumps are not for operators' eyes: see /rates/ and /shed/
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replicas,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        stream_wait_empty=False,
        broker_max_poll_records=5000,
        consumer_max_fetch_size=8 * 1024 * 1024,
        # Items queued per agent stream. An events-topic item is a whole fetched batch (bulk
        # delivery, see streamapp.infra.transport): a few dozen keep the agents fed and bound memory.
        stream_buffer_maxsize=64,
        producer_linger=0.005,
        producer_max_request_size=max(2 * 1024 * 1024, settings.max_record_bytes * 2),
        broker_rebalance_timeout=settings.rebalance_timeout_seconds,
        broker_session_timeout=settings.session_timeout_seconds,
        broker_heartbeat_interval=1.0,
        logging_config=None,
        loghandlers=[],
    )
    services = build_services(app, settings, declare_topics(app, settings))
    app.services = services  # for tests and operators' shells: the app's own services
    register_agents(app, services)
    register_routes(app, services)
    return app


app = create_app()
accept_worker_datadir()
