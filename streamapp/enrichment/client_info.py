"""What the Keen API knows of the client: its address (behind trusted proxies) and the
``${keen.ip}`` / ``${keen.user_agent}`` placeholders an event may hold, filled with it. Pure.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

IP_PLACEHOLDER = "${keen.ip}"
USER_AGENT_PLACEHOLDER = "${keen.user_agent}"
PLACEHOLDER_MARK = b"${keen."


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
