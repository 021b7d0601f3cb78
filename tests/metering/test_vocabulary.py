"""The shed vocabulary (streamapp.metering.vocabulary) is the one every layer validates against."""

from __future__ import annotations

import json

import orjson

from streamapp.metering import (
    MANUAL,
    MODES,
    NOT_SHED,
    SHED_MODES,
    SHED_STATES,
    STATES,
    ManualOverride,
    ShedMode,
    ShedState,
    ShedStatus,
)


def test_values_are_the_wire_strings() -> None:
    assert SHED_MODES == ("divert", "drop", "shadow")
    assert SHED_STATES == ("ok", "shed")
    assert MANUAL == (None, "shed", "unshed")
    assert (MODES, STATES) == (SHED_MODES, SHED_STATES)
    assert NOT_SHED == "ok"
    assert [m.value for m in ManualOverride] == ["shed", "unshed"]


def test_members_equal_and_serialize_as_their_strings() -> None:
    assert ShedMode.DIVERT == "divert" and ShedStatus.SHED == "shed"
    assert orjson.dumps({"mode": ShedMode.DROP}) == b'{"mode":"drop"}'
    assert json.dumps({"state": ShedStatus.OK}) == '{"state": "ok"}'
    state = ShedState("p", state=ShedStatus.SHED, mode=ShedMode.SHADOW)
    assert state.is_shed and not state.enforcing
    assert ShedState.from_dict(orjson.loads(orjson.dumps(state.to_dict()))) == state
