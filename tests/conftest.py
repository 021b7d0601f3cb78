"""Shared fixtures: one embedded broker and S3 server per session, per-test names, worker factories."""

from __future__ import annotations

import uuid
from collections.abc import Generator, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from streamapp.dev import BrokerProcess, S3Process, WorkerProcess, free_port, settings_env
from streamapp.dev import s3_client as make_s3_client

# The cluster secret of every test worker (tests that forge control records sign with others).
CONTROL_SECRET = "test-control-secret-" + uuid.uuid4().hex
# Key under which each phase's report is kept on the test item, so teardown can tell a failed test.
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


# A test that uses any of these needs the real servers: it is an integration test, whether or not
# its module says so (`make unit` runs the others, in seconds).
SERVER_FIXTURES = frozenset({"broker", "s3", "s3_client", "bucket", "worker_env", "start_worker", "start_app_worker"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def _test_failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_REPORTS, {})
    return any(r.failed for r in reports.values())


@pytest.fixture(scope="session")
def devstack_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("devstack-logs")


@pytest.fixture(scope="session")
def broker(devstack_logs: Path) -> Iterator[BrokerProcess]:
    with BrokerProcess(log_dir=devstack_logs) as proc:
        yield proc


@pytest.fixture(scope="session")
def s3(devstack_logs: Path) -> Iterator[S3Process]:
    with S3Process(log_dir=devstack_logs) as proc:
        yield proc


@pytest.fixture(scope="session")
def s3_client(s3: S3Process) -> Any:
    return make_s3_client(s3.endpoint_url)


@pytest.fixture
def unique_name() -> str:
    """Short, lowercase, starts with a letter: valid as app id, topic prefix and bucket name part."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def bucket(s3: S3Process, unique_name: str) -> str:
    name = f"{unique_name}-bucket"
    s3.create_bucket(name)
    return name


class WorkerEnv(Protocol):
    def __call__(self, **overrides: object) -> dict[str, str]: ...


class StartWorker(Protocol):
    def __call__(
        self,
        env: Mapping[str, object] | None = None,
        *,
        wait_ready: bool = True,
        ready_timeout: float = 60.0,
        **kwargs: Any,
    ) -> WorkerProcess: ...


def connection_env(broker: BrokerProcess, s3: S3Process, bucket: str, app_id: str, data_dir: Path) -> dict[str, str]:
    """STREAMAPP_* variables of one worker of app ``app_id``: the test servers, its own web port
    and data dir, the events topic ``{app_id}-events``, and the control secret."""
    return settings_env(
        kafka_bootstrap=broker.bootstrap,
        s3_endpoint_url=s3.endpoint_url,
        s3_bucket=bucket,
        app_id=app_id,
        events_topic=f"{app_id}-events",
        web_host="127.0.0.1",
        web_port=free_port(),
        data_dir=data_dir,
        control_secret=CONTROL_SECRET,
    )


@pytest.fixture
def worker_env(broker: BrokerProcess, s3: S3Process, bucket: str, unique_name: str, tmp_path: Path) -> WorkerEnv:
    """``worker_env(**overrides)``: STREAMAPP_* variables for one worker of this test's app.

    Every call gets its own web port and data dir (so several workers of one app can run side by
    side) but the same app id and events topic (so they share the consumer group). Overrides are
    Settings field names (``window_seconds=5``) or full variable names.
    """
    calls = 0

    def make(**overrides: object) -> dict[str, str]:
        nonlocal calls
        calls += 1
        env = connection_env(broker, s3, bucket, unique_name, tmp_path / f"worker-data-{calls}")
        # Tests produce to projects they never create and expect each to be metered and shed on
        # its own; the default (shared) is covered by tests/metering/test_cardinality.py.
        env.update(settings_env(unknown_projects="export"))
        env.update(settings_env(overrides))
        return env

    return make


@pytest.fixture
def start_worker(request: pytest.FixtureRequest, worker_env: WorkerEnv, tmp_path: Path) -> Iterator[StartWorker]:
    """``start_worker(env=None, *, wait_ready=True, ready_timeout=60, **WorkerProcess kwargs)``.

    Starts a worker (env defaults to ``worker_env()``) and, by default, waits for /healthz. All
    workers are stopped at test end; if the test failed, their log tails are printed.
    """
    workers: list[WorkerProcess] = []

    def start(
        env: Mapping[str, object] | None = None,
        *,
        wait_ready: bool = True,
        ready_timeout: float = 60.0,
        **kwargs: Any,
    ) -> WorkerProcess:
        proc = WorkerProcess(worker_env() if env is None else env, tmp_path / "logs", **kwargs)
        workers.append(proc)
        proc.start()
        if wait_ready:
            proc.wait_ready(ready_timeout)
        return proc

    yield start

    failed = _test_failed(request)
    for proc in workers:
        try:
            # SIGKILL, not a graceful stop (2-5 s each): the test is over and nothing checks how its
            # workers end (tests of the shutdown itself call stop()). Each test has its own app,
            # topics and consumer group, so nothing of a killed worker reaches another test.
            proc.kill()
        finally:
            if failed:
                print(f"\n===== {proc.name} (exit {proc.returncode}) log tail: {proc.log_path} =====")
                print(proc.log_tail(80))


# ------------------------------------------------------------------ one worker per module
@dataclass
class AppWorker:
    """A worker of a fresh app (own app id, topics, bucket, data dir) and the settings it runs with."""

    worker: WorkerProcess
    env: dict[str, str]  # STREAMAPP_* variables
    app_id: str
    bucket: str

    @property
    def web_url(self) -> str:
        return self.worker.web_url

    @property
    def events_topic(self) -> str:
        return self.env["STREAMAPP_EVENTS_TOPIC"]


@contextmanager
def app_worker(
    broker: BrokerProcess,
    s3: S3Process,
    log_dir: Path,
    *,
    prefix: str = "t",
    ready_timeout: float = 90.0,
    **settings: object,
) -> Iterator[AppWorker]:
    """Start one worker of a fresh app and kill it on exit; its log tail is printed if it raised.

    ``settings`` (Settings field names or full variable names) override the connection defaults; the
    worker signs control records with ``CONTROL_SECRET`` unless ``control_secret`` is given.
    """
    name = prefix + uuid.uuid4().hex[:10]
    bucket = f"{name}-bucket"
    s3.create_bucket(bucket)
    env = connection_env(broker, s3, bucket, name, log_dir / f"{name}-data")
    env.update(settings_env(settings))
    worker = WorkerProcess(env, log_dir, name=f"{name}-worker")
    worker.start()
    try:
        worker.wait_ready(ready_timeout)
        yield AppWorker(worker, env, name, bucket)
    except BaseException:
        print(f"\n===== {worker.name} (exit {worker.returncode}) log tail: {worker.log_path} =====")
        print(worker.log_tail(80))
        raise
    finally:
        worker.kill()  # as in start_worker: nothing checks how a test's worker ends


class StartAppWorker(Protocol):
    def __call__(self, **settings: object) -> AppWorker: ...


@pytest.fixture(scope="module")
def start_app_worker(
    request: pytest.FixtureRequest, broker: BrokerProcess, s3: S3Process, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartAppWorker]:
    """``start_app_worker(**settings)``: a worker of a fresh app (``app_worker``) shared by the module.

    For tests that can share one worker: each uses its own project ids or collections, so none sees
    another's data. Every worker is killed at the module's end; if a test of the module failed,
    their log tails are printed. Tests that kill, restart or rebalance workers use ``start_worker``.
    """
    log_dir = tmp_path_factory.mktemp("module-workers")
    started: list[AppWorker] = []
    with ExitStack() as stack:

        def start(**settings: object) -> AppWorker:
            app = stack.enter_context(app_worker(broker, s3, log_dir, **settings))
            started.append(app)
            return app

        failed_before = request.session.testsfailed
        yield start
        if request.session.testsfailed > failed_before:
            for app in started:
                print(f"\n===== {app.worker.name} (exit {app.worker.returncode}) log tail: {app.worker.log_path} =====")
                print(app.worker.log_tail(80))
