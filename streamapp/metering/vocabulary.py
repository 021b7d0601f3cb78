"""The shed vocabulary, defined once: what shedding does (mode), whether a project is shed
(state), and the manual overrides an operator can set.

Every layer that names them uses these: settings validation, control records and the control
plane, the operator CLI, the admin API, the meter and the sink's routing. The enums are
``StrEnum``: a member *is* its string (``ShedMode.DIVERT == "divert"``), so control records,
table rows and JSON written before (or by another worker) read the same, and code may keep
passing plain strings.
"""

from __future__ import annotations

from enum import StrEnum


class ShedMode(StrEnum):
    """What a shed project's excess becomes."""

    DIVERT = "divert"  # into the paced overflow lane, delivered to S3 later
    DROP = "drop"  # dropped (counted)
    SHADOW = "shadow"  # nothing: the project is only reported as shed


class ShedStatus(StrEnum):
    """``ShedState.state``: whether a project is shed now."""

    OK = "ok"
    SHED = "shed"


class ManualOverride(StrEnum):
    """An operator's override (``ShedState.manual``), winning over the rates until cleared."""

    SHED = "shed"
    UNSHED = "unshed"


#: The shed modes as plain strings, for membership tests, argparse ``choices`` and messages.
SHED_MODES: tuple[str, ...] = tuple(mode.value for mode in ShedMode)
#: The values of ``ShedState.state``.
SHED_STATES: tuple[str, ...] = tuple(status.value for status in ShedStatus)
#: The values of ``ShedState.manual``: None (no override), "shed", "unshed".
MANUAL_OVERRIDES: tuple[str | None, ...] = (None, *(override.value for override in ManualOverride))
#: The route of a shed marker that lifts shedding (a marker's mode: a shed mode or this).
NOT_SHED = ShedStatus.OK.value

__all__ = [
    "MANUAL_OVERRIDES",
    "NOT_SHED",
    "SHED_MODES",
    "SHED_STATES",
    "ManualOverride",
    "ShedMode",
    "ShedStatus",
]
