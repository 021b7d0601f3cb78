"""Projects not created in the control plane ("unknown"): the policy names and the shared meter id.

``STREAMAPP_UNKNOWN_PROJECTS`` decides what the Kafka path does with their events (the HTTP API
refuses them with 404 already):

* ``shared``: exported like any project's, but metered and shed as ONE pseudo-project per events
  partition (``_unknown-<partition>``), and uploaded as one flow of the sink's fair upload queue;
* ``export``: each unknown id is metered and shed on its own (every id its own quota);
* ``dead-letter``: to ``events-invalid`` with the reason, never exported (metered as ``shared``).

"Unknown" is read from the control view when the record is processed, like the export target
(``ControlPlane.export_target``): see README "Unknown projects" for what that means for a replay.
"""

from __future__ import annotations

POLICIES = ("shared", "export", "dead-letter")
# "_" ids are reserved for the service (never a project's own), so the pseudo-project cannot
# collide with a real one once reserved names are rejected on every path.
UNKNOWN_PREFIX = "_unknown-"
# The upload flow of every unknown project's objects (a NUL never appears in a project id).
UNKNOWN_FLOW = "\x00unknown"


def shared_meter_id(partition: int) -> str:
    """The pseudo-project that meters every unknown project of ``partition`` as one."""
    return f"{UNKNOWN_PREFIX}{partition}"
