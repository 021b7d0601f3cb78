"""The ``streamapp`` console script (``[project.scripts] streamapp = "streamapp.cli:main"``).

* ``streamapp dev [--demo]``: embedded broker + S3 + one worker, with a status line.
* ``streamapp worker``: a Faust worker against configured Kafka/S3.
* ``streamapp produce``: a load generator that follows the event contract.
* ``streamapp replay``: the 2019 incident replayed, baseline vs protected.
* Operator commands: ``status``, ``project``, ``quota``, ``shed``/``unshed``, ``sink``.

One module per command group (worker, dev, produce, replay, status, project, quota, sink); the
explicit list of commands and the dispatch are in :mod:`streamapp.cli.commands`. Shared pieces:
:mod:`~streamapp.cli.command` (what a command is), :mod:`~streamapp.cli.control_topic`
(``--bootstrap``/``--topic`` of the commands that publish to the control topic),
:mod:`~streamapp.cli.text_table` (operator tables); HTTP/JSON calls to a running worker are
:mod:`streamapp.web.client`'s (the replay's too).
"""

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments), run the command; its exit code."""
    # Imported on call, not with the package: `streamapp replay` spawns its traffic process, which
    # re-runs the console script (so imports this package) and must be sending within the second it
    # is given; the commands' modules (numpy, rich, Kafka and S3 clients) take ~0.4 s to import.
    from streamapp.cli.commands import run

    return run(argv)
