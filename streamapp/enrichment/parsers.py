"""The five parsers behind Keen's add-ons, as pure functions of one value (no I/O, no clock reads).

Each takes the add-on's input value(s) and returns Keen's output object; a bad *value* (an
unparsable IP, URL, user agent or date) gives Keen's blank output, never an error. The databases
(GeoLite2 countries, ua-parser's regexes, Snowplow's referers) are loaded on first use and the
results of repeated inputs are cached, so the sink pays for each distinct value once.
See :mod:`streamapp.enrichment` for the add-ons' names, inputs and outputs.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, urlsplit

# --------------------------------------------------------------------------- ip_to_geo


@lru_cache(maxsize=1)
def _geoip() -> Any:
    # Loaded on first use (~0.1 s, ~100 MB less for workers that never see the add-on).
    from geoip2fast import GeoIP2Fast

    return GeoIP2Fast(geoip2fast_data_file="geoip2fast-ipv6.dat.gz")


EMPTY_GEO: dict[str, Any] = {
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
    out = dict(EMPTY_GEO)
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
    from ua_parser import parse  # loaded on first use: its regexes cost memory and start-up time

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
    from referer_parser import Referer  # loaded on first use: it reads its referers database

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
