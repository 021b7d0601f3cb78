"""``keen.addons`` configurations for the hostile-input property tests (the HTTP API's and the
pipeline's): Keen's auto-collector's own, one-value lookalikes of it that the check must refuse,
and generated ones. Shared so that both paths of the add-on check (``check_event_addons`` at the
API, ``checked_addons`` in the sink and the drain) meet the same hostile configurations."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

PAGEVIEW_ADDONS = [
    {"name": "keen:ua_parser", "input": {"ua_string": "x"}, "output": "ua"},
    {"name": "keen:ip_to_geo", "input": {"ip": "x", "remove_ip_property": True}, "output": "geo"},
    {"name": "keen:date_time_parser", "input": {"date_time": "keen.timestamp"}, "output": "at"},
]
#: One value away from PAGEVIEW_ADDONS, each refused: ``1`` for ``true`` (equal in Python), an IP
#: path inside ``keen`` to remove, an output inside ``keen``, a path with an empty property name.
ADDON_LOOKALIKES = [
    [{**PAGEVIEW_ADDONS[1], "input": {"ip": "x", "remove_ip_property": 1}}],
    [{**PAGEVIEW_ADDONS[1], "input": {"ip": "keen.id", "remove_ip_property": True}}],
    [{**PAGEVIEW_ADDONS[0], "output": "keen.ua"}],
    [{**PAGEVIEW_ADDONS[0], "input": {"ua_string": "x..y"}}],
]


def addon_configs(json: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A ``keen.addons`` value: the auto-collector's, a lookalike, known names with ``json`` inputs
    and outputs, or any ``json``."""
    return st.one_of(
        st.just(PAGEVIEW_ADDONS),
        st.sampled_from(ADDON_LOOKALIKES),
        st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from([a["name"] for a in PAGEVIEW_ADDONS]) | json, "input": json, "output": json}
            ),
            max_size=3,
        ),
        json,
    )
