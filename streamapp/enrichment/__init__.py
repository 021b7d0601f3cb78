"""Keen's data enrichment add-ons, as pure functions of one event (no I/O, no clock reads).

An event asks for add-ons in ``keen.addons``, a list of
``{"name": "keen:<addon>", "input": {<param>: "<dotted.property.path>", ...}, "output": "<dotted.path>"}``
(Keen's names, inputs and outputs: https://keen.io/docs/streams/data-enrichment-overview/):

* ``keen:ip_to_geo``: input ``ip`` (optional ``remove_ip_property``) -> ``{city, province, country,
  country_code, continent, postal_code, coordinates}``. Database: ``geoip2fast``'s bundled
  ``geoip2fast-ipv6.dat.gz`` (MaxMind GeoLite2 country data of 2024-06-18, IPv4 and IPv6). It
  holds countries only: ``city``, ``province``, ``continent``, ``postal_code`` and
  ``coordinates`` are null. Private, reserved and malformed addresses give all-null values.
* ``keen:ua_parser``: input ``ua_string`` -> ``{device: {family, type}, browser: {family, major,
  minor, patch}, os: {family, major, minor, patch, patch_minor}}`` (the ``ua-parser`` package, its
  ``ua-parser-builtins`` regexes and its native ``ua-parser-rs`` matcher; the first 512 characters
  of the string; version numbers as numbers when they are numbers;
  ``device.type`` is our coarse classification, absent when unknown, as Keen documents).
* ``keen:url_parser``: input ``url`` -> ``{protocol, domain, path, anchor, query_string}``
  (urllib.parse; parts the URL lacks are omitted, as Keen documents).
* ``keen:referrer_parser``: inputs ``referrer_url``, ``page_url`` -> ``{medium, source, term}``,
  medium one of SEARCH, SOCIAL, EMAIL, INTERNAL, UNKNOWN (the ``referer-parser`` package with
  Snowplow's referers database, release 0.4.1 of 2016-06: unmaintained, but the database Keen's
  own parser was built on). Malformed URLs give null values.
* ``keen:date_time_parser``: input ``date_time`` (ISO-8601) -> ``{millisecond, second, minute,
  hour, day_of_week, day_of_week_string, day_of_month, week, month, year, timezone_offset}``; the
  parts are UTC, ``day_of_week`` is ISO (Monday 1 .. Sunday 7), ``week`` the ISO week,
  ``timezone_offset`` the input's offset from UTC in hours.

A bad configuration (unknown name, missing or non-string input paths, bad output path, too many
add-ons) raises :class:`AddonError`: the API answers 400 and the sink dead-letters the event.
Bad *values* (an unparsable IP, URL or date) are not errors: Keen records blank outputs.
``keen.addons`` is removed from the recorded event, as Keen does.

Determinism: outputs depend only on the event and the installed databases, so a replay after a
crash writes the same bytes (as long as the packages are not upgraded in between).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

#: Add-ons one event may ask for: each costs CPU on the shared sink, so a hostile event is bounded.
MAX_ADDONS_PER_EVENT = 10
#: Longest input string parsed; longer ones are cut.
MAX_INPUT_CHARS = 2048
#: Longest user agent parsed (real browsers' are < 300 chars): regex matching cost grows with length.
MAX_USER_AGENT_CHARS = 512
#: Longest dotted property path of an input or output.
MAX_PATH_CHARS = 256

IP_PLACEHOLDER = "${keen.ip}"
USER_AGENT_PLACEHOLDER = "${keen.user_agent}"
PLACEHOLDER_MARK = b"${keen."


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


# --------------------------------------------------------------------------- ip_to_geo


@lru_cache(maxsize=1)
def _geoip() -> Any:
    # Loaded on first use (~0.1 s, ~100 MB less for workers that never see the add-on).
    from geoip2fast import GeoIP2Fast

    return GeoIP2Fast(geoip2fast_data_file="geoip2fast-ipv6.dat.gz")


_EMPTY_GEO: dict[str, Any] = {
    "city": None,
    "province": None,
    "country": None,
    "country_code": None,
    "continent": None,
    "postal_code": None,
    "coordinates": None,
}


@lru_cache(maxsize=4096)
def ip_to_geo(ip: str) -> dict[str, Any]:
    """Keen's ``ip_geo_info`` for one address (all None when unknown, private or malformed)."""
    out = dict(_EMPTY_GEO)
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return out
    if not address.is_global:
        return out
    try:
        found = _geoip().lookup(str(address))
    except Exception:  # noqa: BLE001 - a database miss must never fail the event
        return out
    code = getattr(found, "country_code", "") or ""
    if len(code) == 2 and code.isalpha() and not getattr(found, "is_private", False):
        out["country_code"] = code
        out["country"] = getattr(found, "country_name", None) or None
    return out


# --------------------------------------------------------------------------- ua_parser

_TABLET = re.compile(r"iPad|Tablet|Kindle|Silk|PlayBook|Nexus (7|9|10)\b", re.IGNORECASE)
_MOBILE = re.compile(r"Mobi|iPhone|iPod|Windows Phone|BlackBerry|Opera Mini", re.IGNORECASE)
_DESKTOP_OS = ("Windows", "Mac OS X", "Linux", "Ubuntu", "Chrome OS", "Fedora", "Debian", "FreeBSD", "macOS")


def _number(text: str | None) -> int | str | None:
    """Keen documents version parts as numbers: digits become ints, anything else stays as is."""
    if text is None:
        return None
    return int(text) if text.isdigit() and len(text) < 10 else text


def _device_type(ua: str, device_family: str | None, os_family: str | None) -> str | None:
    """A coarse class (ours: ua-parser has none): spider, tablet, mobile phone, desktop or None."""
    if device_family == "Spider":
        return "spider"
    if _TABLET.search(ua) or (os_family == "Android" and "Mobile" not in ua):
        return "tablet"
    if _MOBILE.search(ua):
        return "mobile phone"
    if os_family and os_family.startswith(_DESKTOP_OS):
        return "desktop"
    return None


@lru_cache(maxsize=4096)
def _parse_ua_cached(ua: str) -> dict[str, Any]:
    from ua_parser import parse

    result = parse(ua)
    agent, os_, device = result.user_agent, result.os, result.device
    device_family = device.family if device is not None else "Other"
    os_family = os_.family if os_ is not None else "Other"
    device_out: dict[str, Any] = {"family": device_family}
    kind = _device_type(ua, device_family, os_family)
    if kind is not None:
        device_out["type"] = kind
    return {
        "device": device_out,
        "browser": {
            "family": agent.family if agent is not None else "Other",
            "major": _number(agent.major) if agent is not None else None,
            "minor": _number(agent.minor) if agent is not None else None,
            "patch": _number(agent.patch) if agent is not None else None,
        },
        "os": {
            "family": os_family,
            "major": _number(os_.major) if os_ is not None else None,
            "minor": _number(os_.minor) if os_ is not None else None,
            "patch": _number(os_.patch) if os_ is not None else None,
            "patch_minor": _number(os_.patch_minor) if os_ is not None else None,
        },
    }


def parse_user_agent(ua: str | None) -> dict[str, Any]:
    """Keen's ``ua_parser`` output for a User-Agent string (a fresh copy: callers may mutate it)."""
    if not ua:
        return {
            "device": {"family": "Other"},
            "browser": {"family": "Other", "major": None, "minor": None, "patch": None},
            "os": {"family": "Other", "major": None, "minor": None, "patch": None, "patch_minor": None},
        }
    cached = _parse_ua_cached(ua)
    return {k: dict(v) for k, v in cached.items()}


# --------------------------------------------------------------------------- url_parser


def parse_url(url: str | None) -> dict[str, Any]:
    """Keen's ``url_parser`` output; the parts a URL lacks are omitted (an empty object when malformed)."""
    if not url:
        return {}
    cached = _parse_url_cached(url)
    out = dict(cached)  # a copy: callers may mutate the event
    if "query_string" in out:
        out["query_string"] = dict(out["query_string"])
    return out


@lru_cache(maxsize=4096)  # pages repeat: most events of a site share a few hundred URLs
def _parse_url_cached(url: str) -> dict[str, Any]:
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:
        return {}
    out: dict[str, Any] = {}
    if parts.scheme:
        out["protocol"] = parts.scheme
    if host:
        out["domain"] = host
    if parts.path:
        out["path"] = parts.path
    if parts.fragment:
        out["anchor"] = parts.fragment
    if parts.query:
        out["query_string"] = dict(parse_qsl(parts.query, keep_blank_values=True))
    return out


# --------------------------------------------------------------------------- referrer_parser


def parse_referrer(referrer_url: str | None, page_url: str | None) -> dict[str, Any]:
    """Keen's ``referrer_parser`` output: medium (upper case), source and search term."""
    if not referrer_url:
        return {"medium": None, "source": None, "term": None}
    return dict(_parse_referrer_cached(referrer_url, page_url or ""))  # a copy: callers may mutate it


@lru_cache(maxsize=4096)  # (referrer, page) pairs repeat: a few search engines, a few hundred pages
def _parse_referrer_cached(referrer_url: str, page_url: str) -> dict[str, Any]:
    blank: dict[str, Any] = {"medium": None, "source": None, "term": None}
    from referer_parser import Referer

    try:
        ref = Referer(referrer_url.strip(), page_url.strip() or None)
    except (ValueError, AttributeError, TypeError):
        return blank
    if not ref.known:
        return blank
    return {"medium": str(ref.medium).upper(), "source": ref.referer, "term": ref.search_term}


# --------------------------------------------------------------------------- date_time_parser

_DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def parse_date_time(value: Any) -> dict[str, Any] | None:
    """Keen's ``date_time_parser`` output for an ISO-8601 string; None when it is not one."""
    if not isinstance(value, str) or not 4 <= len(value) <= 64:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
        offset = parsed.utcoffset()
        utc = parsed.astimezone(UTC) if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError):  # not ISO-8601, or out of range once moved to UTC
        return None
    offset_hours = offset.total_seconds() / 3600 if offset is not None else 0.0
    iso_year, iso_week, iso_day = utc.isocalendar()
    return {
        "millisecond": utc.microsecond // 1000,
        "second": utc.second,
        "minute": utc.minute,
        "hour": utc.hour,
        "day_of_week": iso_day,
        "day_of_week_string": _DAY_NAMES[iso_day - 1],
        "day_of_month": utc.day,
        "week": iso_week,
        "month": utc.month,
        "year": utc.year,
        "timezone_offset": int(offset_hours) if offset_hours.is_integer() else offset_hours,
    }


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


def check_addons(addons: Any) -> list[tuple[str, dict[str, Any], str]]:
    """Validate a ``keen.addons`` value; the (name, input, output) of each add-on. AddonError when bad."""
    if type(addons) is not list:
        raise AddonError(f"keen.addons must be a list, not a JSON {type(addons).__name__}")
    if len(addons) > MAX_ADDONS_PER_EVENT:
        raise AddonError(f"keen.addons has {len(addons)} add-ons, over the limit of {MAX_ADDONS_PER_EVENT}")
    checked = []
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


def check_event_addons(event: dict[str, Any]) -> None:
    """The API's check of one event's ``keen.addons``: the configuration, and that no output goes
    through a property of the event that is not an object (the sink would dead-letter it)."""
    for _, _, output in check_addons(event["keen"]["addons"]):
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
        result: Any = dict(ip_to_geo(ip)) if ip else dict(_EMPTY_GEO)
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
    checked = check_addons(keen.get("addons"))
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


# --------------------------------------------------------------------------- API placeholders


def fill_placeholders(value: Any, ip: str, user_agent: str) -> Any:
    """Replace ``${keen.ip}`` and ``${keen.user_agent}`` string values (anywhere in the event) in place.

    Iterative, not recursive: a hostile body nested 1,000 levels deep must not raise RecursionError.
    """
    replacements = {IP_PLACEHOLDER: ip, USER_AGENT_PLACEHOLDER: user_agent}
    pending: list[Any] = [value]
    while pending:
        node = pending.pop()
        items = node.items() if type(node) is dict else enumerate(node)
        for key, item in items:
            kind = type(item)
            if kind is str:
                if item in replacements:
                    node[key] = replacements[item]
            elif kind is dict or kind is list:
                pending.append(item)
    return value


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_trusted_proxies(text: str) -> tuple[Network, ...]:
    """``STREAMAPP_TRUSTED_PROXIES``: comma-separated addresses or CIDR networks; ValueError when bad."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


def _is_trusted(address: str, trusted: Iterable[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def client_ip(peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]) -> str:
    """The client's address: the TCP peer, unless the peer is a trusted proxy; then the right-most
    address of ``X-Forwarded-For`` that is not itself a trusted proxy (a client can prepend any
    addresses it likes, so only the part appended by our own proxies is believed)."""
    peer = peer or ""
    if not trusted or not forwarded_for or not _is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # garbage where an address should be: believe only the peer
    return peer  # every hop is one of our proxies: the request came from inside
