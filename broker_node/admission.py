"""Who a connection comes from, and whether its browser page may connect (pure functions).

Behind a load balancer or reverse proxy every TCP connection comes from the proxy. The client's
own address is then taken from ``X-Forwarded-For`` (the rightmost address that is not itself a
trusted proxy: each proxy appends the address it saw, and only trusted hops can be believed) or
else ``X-Real-IP``, and only when the TCP peer is a configured trusted proxy; from anyone else
those headers are ignored, since a client can write whatever it likes in them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

from websockets.datastructures import Headers

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Where a browser says which page opened the connection.
ORIGIN: Final = "Origin"


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """Addresses or CIDR ranges; raises ``ValueError`` on anything else."""
    return tuple(ipaddress.ip_network(value.strip(), strict=False) for value in values)


def _trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def client_address(peer: str, headers: Headers, trusted: tuple[Network, ...]) -> str:
    """The client's address: the TCP peer, or what a trusted proxy says the client's is."""
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops = [
        hop.strip()
        for value in headers.get_all("X-Forwarded-For")
        for hop in value.split(",")
        if hop.strip()
    ]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return _valid(hop) or peer
    real = headers.get("X-Real-IP", "").strip()
    if real:
        return _valid(real) or peer
    # Every hop was a trusted proxy (or none was named): the leftmost is the client.
    return (_valid(hops[0]) or peer) if hops else peer


def _valid(address: str) -> str | None:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


def origin_allowed(headers: Headers, allowed: tuple[str, ...]) -> bool:
    """No allow-list, or no ``Origin`` (not a browser), or an ``Origin`` on the list."""
    if not allowed:
        return True
    origin = headers.get(ORIGIN)
    if origin is None:
        return True
    return origin.rstrip("/").lower() in allowed
