"""Checking and running the add-ons one event asks for in ``keen.addons`` (pure: no I/O, no clock reads).

The API checks an event's add-on configuration (:func:`check_event_addons`: a bad one answers 400);
the sink runs them just before writing the event (:func:`run_addons`: a bad one dead-letters the
event). The dotted property paths of inputs and outputs are resolved here; the parsers themselves
live in :mod:`streamapp.enrichment.parsers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from streamapp.enrichment.parsers import (
    EMPTY_GEO,
    ip_to_geo,
    parse_date_time,
    parse_referrer,
    parse_url,
    parse_user_agent,
)

#: Add-ons one event may ask for: each costs CPU on the shared sink, so a hostile event is bounded.
MAX_ADDONS_PER_EVENT = 10
#: Longest input string parsed; longer ones are cut.
MAX_INPUT_CHARS = 2048
#: Longest user agent parsed (real browsers' are < 300 chars): regex matching cost grows with length.
MAX_USER_AGENT_CHARS = 512
#: Longest dotted property path of an input or output.
MAX_PATH_CHARS = 256


class AddonError(ValueError):
    """A ``keen.addons`` configuration that cannot be run; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- property paths


def get_path(event: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted property path, or None when any step is missing or not an object."""
    value: Any = event
    for part in path.split("."):
        if type(value) is not dict:
            return None
        value = value.get(part)
    return value


def set_path(event: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted property path, creating objects on the way; AddonError when a step is not one."""
    parts = path.split(".")
    target = event
    for part in parts[:-1]:
        nxt = target.get(part)
        if nxt is None:
            nxt = target[part] = {}
        elif type(nxt) is not dict:
            raise AddonError(f"output {path!r}: property {part!r} exists and is not an object")
        target = nxt
    target[parts[-1]] = value


def delete_path(event: dict[str, Any], path: str) -> None:
    parts = path.split(".")
    target: Any = event
    for part in parts[:-1]:
        target = target.get(part) if type(target) is dict else None
    if type(target) is dict:
        target.pop(parts[-1], None)


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value[:MAX_INPUT_CHARS]
    return None


# --------------------------------------------------------------------------- the add-on table

#: name -> (required inputs, optional inputs)
ADDON_INPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "keen:ip_to_geo": (("ip",), ("remove_ip_property",)),
    "keen:ua_parser": (("ua_string",), ()),
    "keen:url_parser": (("url",), ()),
    "keen:referrer_parser": (("referrer_url", "page_url"), ()),
    "keen:date_time_parser": (("date_time",), ()),
}


def _check_path(what: str, path: Any) -> str:
    if not isinstance(path, str) or not path or len(path) > MAX_PATH_CHARS:
        raise AddonError(f"{what} must be a property name (a non-empty string of at most {MAX_PATH_CHARS} chars)")
    if any(not part for part in path.split(".")):
        raise AddonError(f"{what} {path!r} has an empty property name")
    return path


#: A checked ``keen.addons``: the (name, input, output) of each add-on, in order.
Checked = list[tuple[str, dict[str, Any], str]]


def check_addons(addons: Any) -> Checked:
    """Validate a ``keen.addons`` value; the (name, input, output) of each add-on. AddonError when bad."""
    if type(addons) is not list:
        raise AddonError(f"keen.addons must be a list, not a JSON {type(addons).__name__}")
    if len(addons) > MAX_ADDONS_PER_EVENT:
        raise AddonError(f"keen.addons has {len(addons)} add-ons, over the limit of {MAX_ADDONS_PER_EVENT}")
    checked: Checked = []
    for n, addon in enumerate(addons):
        if type(addon) is not dict:
            raise AddonError(f"keen.addons[{n}] must be an object")
        name = addon.get("name")
        spec = ADDON_INPUTS.get(name) if isinstance(name, str) else None
        if spec is None:
            raise AddonError(f"keen.addons[{n}]: unknown add-on {name!r} (known: {', '.join(sorted(ADDON_INPUTS))})")
        inputs = addon.get("input")
        if type(inputs) is not dict:
            raise AddonError(f"keen.addons[{n}] ({name}): 'input' must be an object")
        required, optional = spec
        for param in required:
            if param not in inputs:
                raise AddonError(f"keen.addons[{n}] ({name}): input {param!r} is missing")
            _check_path(f"keen.addons[{n}] ({name}): input {param!r}", inputs[param])
        for param in inputs:
            if param not in required and param not in optional:
                raise AddonError(f"keen.addons[{n}] ({name}): unknown input {param!r}")
        if "remove_ip_property" in inputs:
            if type(inputs["remove_ip_property"]) is not bool:
                raise AddonError(f"keen.addons[{n}] ({name}): input 'remove_ip_property' must be true or false")
            ip_path = inputs["ip"]
            if inputs["remove_ip_property"] and (ip_path == "keen" or ip_path.startswith("keen.")):
                raise AddonError(f"keen.addons[{n}] ({name}): remove_ip_property may not remove {ip_path!r}")
        output = _check_path(f"keen.addons[{n}] ({name}): 'output'", addon.get("output"))
        if output == "keen" or output.startswith("keen."):
            raise AddonError(f"keen.addons[{n}] ({name}): output {output!r} may not be inside 'keen'")
        checked.append((name, inputs, output))
    return checked


#: The last configuration checked by :func:`checked_addons` (a private copy) and its result: the
#: events of one batch nearly always ask for the same add-ons, and checking them again was ~40 %
#: of what exporting a pageview costs. One tuple, so a reader never pairs one's spec with another's.
_last_checked: tuple[list[Any], Checked] | None = None


def _copy_spec(addons: list[Any]) -> list[Any]:
    """A copy of a checked configuration that no event shares (its inputs are copied too)."""
    return [{**addon, "input": dict(addon["input"])} for addon in addons]


def checked_addons(addons: Any) -> Checked:
    """:func:`check_addons`, answered from the last configuration checked when ``addons`` equals it.

    Python's ``==`` is looser than the check in one place only: ``1 == 1.0 == True``, and the one
    non-string value a configuration may hold is the boolean ``remove_ip_property``; so a hit also
    needs each of those to be a bool. Any other difference (a type, a key, a string) is unequal.
    """
    global _last_checked
    last = _last_checked
    if last is not None and type(addons) is list and addons == last[0]:
        for addon in addons:
            if "remove_ip_property" in addon["input"] and type(addon["input"]["remove_ip_property"]) is not bool:
                break
        else:
            return last[1]
    checked = check_addons(addons)
    spec = _copy_spec(addons)
    _last_checked = (spec, [(name, spec[n]["input"], output) for n, (name, _, output) in enumerate(checked)])
    return checked


def check_event_addons(event: dict[str, Any]) -> None:
    """The API's check of one event's ``keen.addons``: the configuration, and that no output goes
    through a property of the event that is not an object (the sink would dead-letter it)."""
    for _, _, output in checked_addons(event["keen"]["addons"]):
        target: Any = event
        for part in output.split(".")[:-1]:
            target = target.get(part)
            if target is None:
                break
            if type(target) is not dict:
                raise AddonError(f"output {output!r}: property {part!r} exists and is not an object")


def _run_one(event: dict[str, Any], name: str, inputs: dict[str, Any], output: str) -> None:
    if name == "keen:ip_to_geo":
        ip = _text(get_path(event, inputs["ip"]))
        # A copy: the cached dict must not be shared with (and mutated through) the event.
        result: Any = dict(ip_to_geo(ip)) if ip else dict(EMPTY_GEO)
        if inputs.get("remove_ip_property"):
            delete_path(event, inputs["ip"])
    elif name == "keen:ua_parser":
        ua = _text(get_path(event, inputs["ua_string"]))
        result = parse_user_agent(ua[:MAX_USER_AGENT_CHARS] if ua else ua)
    elif name == "keen:url_parser":
        result = parse_url(_text(get_path(event, inputs["url"])))
    elif name == "keen:referrer_parser":
        result = parse_referrer(
            _text(get_path(event, inputs["referrer_url"])), _text(get_path(event, inputs["page_url"]))
        )
    else:  # keen:date_time_parser
        result = parse_date_time(get_path(event, inputs["date_time"]))
    set_path(event, output, result)


def run_addons(event: dict[str, Any]) -> None:
    """Run the add-ons ``event["keen"]["addons"]`` asks for, in order, in place; remove ``keen.addons``.

    Raises AddonError (the event is then invalid) on a bad configuration; never on bad values.
    """
    keen = event["keen"]
    checked = checked_addons(keen.get("addons"))
    for name, inputs, output in checked:
        try:
            _run_one(event, name, inputs, output)
        except AddonError:
            raise
        except Exception as exc:  # noqa: BLE001 - a library choking on a hostile value: this event only
            raise AddonError(f"add-on {name} failed on this event's input ({type(exc).__name__})") from None
    del keen["addons"]


def dead_letter_bytes(event: dict[str, Any], record_value: bytes | None) -> bytes | None:
    """The event's JSON for the dead letter; the whole record's bytes when it cannot be encoded
    (orjson refuses nesting deeper than 255, which its decoder accepts)."""
    try:
        return orjson.dumps(event)
    except TypeError:
        return record_value
