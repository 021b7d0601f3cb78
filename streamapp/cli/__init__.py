"""The ``streamapp`` console script (``[project.scripts] streamapp = "streamapp.cli:main"``).

* ``streamapp dev [--demo]``: embedded broker + S3 + one worker, with a status line.
* ``streamapp worker``: a Faust worker against configured Kafka/S3.
* ``streamapp produce``: a load generator that follows the event contract.
* ``streamapp replay``: the 2019 incident replayed, baseline vs protected.
* Operator commands: ``status``, ``project``, ``quota``, ``shed``/``unshed``, ``sink``.

One module per command group (worker, dev, produce, replay, status, project, quota, sink); the
explicit list of commands and the dispatch are in :mod:`streamapp.cli.main`. Shared pieces:
:mod:`~streamapp.cli.command` (what a command is), :mod:`~streamapp.cli.http_client` (HTTP/JSON calls
to a running worker), :mod:`~streamapp.cli.control_topic` (``--bootstrap``/``--topic`` of the
commands that publish to the control topic), :mod:`~streamapp.cli.text_table` (operator tables).
"""

from streamapp.cli.main import COMMANDS, main
from streamapp.cli.project import render_projects
from streamapp.cli.quota import project_id_arg
from streamapp.cli.sink import render_parked

__all__ = ["COMMANDS", "main", "project_id_arg", "render_parked", "render_projects"]
