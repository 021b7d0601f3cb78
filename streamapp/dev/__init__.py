"""The embedded dev stack, the demo traffic and the load generator: development and test tooling,
not production code.

A Tansu Kafka broker, a moto S3 server and streamapp workers as subprocesses, used by
``streamapp dev`` and by the pytest fixtures. Everything runs on 127.0.0.1 on free ports and keeps
its data in memory, so several stacks (parallel test sessions, other engineers) can coexist.

One module per process: :mod:`~streamapp.dev.processes` (the base: process groups, death signal,
log files), :mod:`~streamapp.dev.broker`, :mod:`~streamapp.dev.s3`, :mod:`~streamapp.dev.worker`,
:mod:`~streamapp.dev.stack` (all of them together); :mod:`~streamapp.dev.ports` (free ports);
:mod:`~streamapp.dev.demo` (``streamapp dev --demo``'s traffic) and :mod:`~streamapp.dev.load`
(``streamapp produce``'s load generator). The demo is not re-exported: it imports the Keen API
(and so Faust), which importing the package must not cost.
"""

from streamapp.dev.broker import BrokerProcess
from streamapp.dev.load import produce_load
from streamapp.dev.ports import HOST, free_port
from streamapp.dev.processes import AWS_DUMMY_ENV, PROJECT_ROOT, DevStackError
from streamapp.dev.s3 import S3Process, s3_client
from streamapp.dev.stack import DevStack
from streamapp.dev.worker import WorkerProcess, settings_env

__all__ = [
    "AWS_DUMMY_ENV",
    "HOST",
    "PROJECT_ROOT",
    "BrokerProcess",
    "DevStack",
    "DevStackError",
    "S3Process",
    "WorkerProcess",
    "free_port",
    "produce_load",
    "s3_client",
    "settings_env",
]
