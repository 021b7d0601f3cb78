"""What one worker is made of, built once and in one place: ``build_services`` and the two ``register``s.

``create_app`` (``streamapp.app``) calls, in this order:

1. ``build_services(app, settings, topics)``: every service of the worker, constructed in
   dependency order, each given only the collaborators it uses (settings, the metrics it counts
   into, the S3 writer, the control plane, another service's method...). The result is one
   frozen ``WorkerServices`` whose fields are all declared here: nothing is attached later, so
   nothing depends on the order in which agents or routes are registered.
2. ``register_agents(app, services)``: the Faust layer (``streamapp.agents``), one thin module
   per agent or task, each wiring a stream or a timer to one service.
3. ``register_routes(app, services)``: the HTTP routes, each domain's views mounted from its
   own package (Keen's write API, the admin API, the read views, /metrics, the dashboard).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import faust

from streamapp.agents.control import register_control
from streamapp.agents.drain import register_drain
from streamapp.agents.meter import register_meter
from streamapp.agents.parking import register_parking
from streamapp.agents.sink import register_sink
from streamapp.api import IngestApi, register_api
from streamapp.control import ControlPlane
from streamapp.control.admin import AdminApi
from streamapp.control.views import register_admin
from streamapp.infra.background import BackgroundTasks
from streamapp.metering.debug_page import register_meter_page
from streamapp.metering.service import Meter
from streamapp.metering.views import MeteringViews, register_metering_views
from streamapp.metrics import Metrics, ScrapeSources
from streamapp.overflow import OverflowDrain, OverflowLane, export_pool
from streamapp.settings import Settings
from streamapp.sink import CheckpointStore, Parking, S3Sink, S3Writer
from streamapp.sink.views import SinkViews, register_sink_views
from streamapp.tables.meter import MeterTables, declare_tables
from streamapp.topics import Topics
from streamapp.web.cluster import Cluster
from streamapp.web.dashboard import register_dashboard
from streamapp.web.health import Readiness, register_health
from streamapp.web.metrics_view import register_metrics

if TYPE_CHECKING:
    from streamapp.app import StreamappApp


@dataclass(frozen=True)
class WorkerServices:
    """Everything one worker holds besides the Faust app (see the module docstring)."""

    settings: Settings
    topics: Topics
    metrics: Metrics
    background: BackgroundTasks  # fire-and-forget sends (notices, dead letters), referenced and logged
    s3: S3Writer
    control: ControlPlane
    checkpoints: CheckpointStore  # shared by the sink and the drain
    parking: Parking  # a tenant's failing bucket: its objects wait here
    sink: S3Sink
    tables: MeterTables
    meter: Meter
    drain: OverflowDrain
    api: IngestApi
    admin: AdminApi
    cluster: Cluster  # peers and fan-out, shared by every read view
    readiness: Readiness
    metering_views: MeteringViews
    sink_views: SinkViews


def build_services(app: faust.App, settings: Settings, topics: Topics) -> WorkerServices:
    metrics = Metrics()
    background = BackgroundTasks()
    s3 = S3Writer(settings)
    control = ControlPlane(settings)
    checkpoints = CheckpointStore(s3, settings.s3_bucket, settings.s3_prefix, settings.app_id)
    objects_topic = topics.objects.get_topic_name()
    parking = Parking(app=app, settings=settings, s3=s3, objects_topic=objects_topic, spawn=background.spawn)
    sink = S3Sink(
        app=app,
        settings=settings,
        s3=s3,
        checkpoints=checkpoints,
        parking=parking,
        overflow=OverflowLane(app, settings),
        control=control,
        export_target=control.export_target,
        invalid_topic=topics.invalid.get_topic_name(),
        overflow_topic=topics.overflow.get_topic_name(),
        objects_topic=objects_topic,
        metrics=metrics,
        spawn=background.spawn,
    )
    tables = declare_tables(app, settings)
    meter = Meter(app, settings, control, sink, tables)
    drain = OverflowDrain(
        app=app,
        settings=settings,
        topic=topics.overflow.get_topic_name(),
        objects_topic=objects_topic,
        events_topic=topics.events.get_topic_name(),
        invalid_topic=topics.invalid.get_topic_name(),
        checkpoints=checkpoints,
        parking=parking,
        export_target=control.export_target,
        sink_backlog=sink.backlog,
        metrics=metrics,
        spawn=background.spawn,
        pool=export_pool(settings),
    )
    metrics.bind(ScrapeSources(meter=meter, sink=sink, s3=s3, parking=parking, drain_status=drain.status))
    cluster = Cluster(app, settings)
    return WorkerServices(
        settings=settings,
        topics=topics,
        metrics=metrics,
        background=background,
        s3=s3,
        control=control,
        checkpoints=checkpoints,
        parking=parking,
        sink=sink,
        tables=tables,
        meter=meter,
        drain=drain,
        api=IngestApi(settings, control, metrics.registry, app),
        admin=AdminApi(settings, control),
        cluster=cluster,
        readiness=Readiness(app, settings, control, sink, cluster),
        metering_views=MeteringViews(settings, meter, control.view, cluster),
        sink_views=SinkViews(app, sink, s3, parking, drain.status, cluster),
    )


def register_agents(app: StreamappApp, services: WorkerServices) -> None:
    topics = services.topics
    register_sink(app, services.sink, topics.events)
    register_control(app, services.control)
    register_meter(app, services.meter, services.tables, topics.events, topics.control)
    register_drain(app, services.drain, topics.overflow)
    register_parking(app, services.parking)


def register_routes(app: faust.App, services: WorkerServices) -> None:
    settings = services.settings
    register_api(app, services.api, services.topics.control)  # Keen's write API
    register_admin(app, services.admin, services.parking, services.cluster)
    register_health(app, services.readiness)
    register_metering_views(app, services.metering_views)
    register_meter_page(app, services.meter, services.drain.status, settings)
    register_sink_views(app, services.sink_views, settings)
    register_metrics(app, services.metrics, settings)
    register_dashboard(app, settings)
