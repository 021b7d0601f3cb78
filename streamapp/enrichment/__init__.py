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

Modules: :mod:`~streamapp.enrichment.parsers` (the five parsers), :mod:`~streamapp.enrichment.addons`
(checking and running ``keen.addons``), :mod:`~streamapp.enrichment.client_info` (the client's
address behind trusted proxies, and the placeholders filled with it).
"""

from streamapp.enrichment.addons import (
    ADDON_INPUTS,
    MAX_ADDONS_PER_EVENT,
    MAX_INPUT_CHARS,
    MAX_PATH_CHARS,
    MAX_USER_AGENT_CHARS,
    AddonError,
    check_addons,
    check_event_addons,
    checked_addons,
    dead_letter_bytes,
    delete_path,
    get_path,
    run_addons,
    set_path,
)
from streamapp.enrichment.client_info import (
    IP_PLACEHOLDER,
    PLACEHOLDER_MARK,
    USER_AGENT_PLACEHOLDER,
    Network,
    client_ip,
    fill_placeholders,
    parse_trusted_proxies,
)
from streamapp.enrichment.parsers import ip_to_geo, parse_date_time, parse_referrer, parse_url, parse_user_agent

__all__ = [
    "ADDON_INPUTS",
    "IP_PLACEHOLDER",
    "MAX_ADDONS_PER_EVENT",
    "MAX_INPUT_CHARS",
    "MAX_PATH_CHARS",
    "MAX_USER_AGENT_CHARS",
    "PLACEHOLDER_MARK",
    "USER_AGENT_PLACEHOLDER",
    "AddonError",
    "Network",
    "check_addons",
    "checked_addons",
    "check_event_addons",
    "client_ip",
    "dead_letter_bytes",
    "delete_path",
    "fill_placeholders",
    "get_path",
    "ip_to_geo",
    "parse_date_time",
    "parse_referrer",
    "parse_trusted_proxies",
    "parse_url",
    "parse_user_agent",
    "run_addons",
    "set_path",
]
