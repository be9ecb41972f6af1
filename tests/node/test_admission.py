"""Client addresses behind trusted proxies, and the Origin allow-list."""

from __future__ import annotations

import pytest
from websockets.datastructures import Headers

from broker_node.admission import client_address, origin_allowed, parse_networks

PROXIES = parse_networks(["10.0.0.0/8", "192.168.1.5"])


def headers(*pairs: tuple[str, str]) -> Headers:
    made = Headers()
    for name, value in pairs:
        made[name] = value
    return made


def test_an_untrusted_peer_is_the_client_whatever_it_writes() -> None:
    sent = headers(("X-Forwarded-For", "1.2.3.4"), ("X-Real-IP", "5.6.7.8"))
    assert client_address("203.0.113.9", sent, PROXIES) == "203.0.113.9"
    assert client_address("10.1.1.1", sent, ()) == "10.1.1.1"


def test_the_rightmost_untrusted_hop_is_the_client() -> None:
    # The client forged the first hop; the proxies appended the rest.
    sent = headers(("X-Forwarded-For", "6.6.6.6, 198.51.100.7, 10.2.3.4"))
    assert client_address("10.0.0.1", sent, PROXIES) == "198.51.100.7"


def test_several_forwarded_for_headers_read_as_one_list() -> None:
    sent = headers(("X-Forwarded-For", "198.51.100.7"), ("X-Forwarded-For", "192.168.1.5"))
    assert client_address("10.0.0.1", sent, PROXIES) == "198.51.100.7"


def test_x_real_ip_when_there_is_no_forwarded_for() -> None:
    assert client_address("10.0.0.1", headers(("X-Real-IP", "2001:db8::1")), PROXIES) == (
        "2001:db8::1"
    )


@pytest.mark.parametrize("value", ["not-an-ip", "", " , "])
def test_garbage_from_a_proxy_falls_back_to_the_peer(value: str) -> None:
    assert client_address("10.0.0.1", headers(("X-Forwarded-For", value)), PROXIES) == ("10.0.0.1")


def test_origins() -> None:
    allowed = ("https://app.example.com",)
    assert origin_allowed(headers(("Origin", "https://evil.example")), ()) is True
    assert origin_allowed(headers(), allowed) is True
    assert origin_allowed(headers(("Origin", "https://App.example.com")), allowed) is True
    assert origin_allowed(headers(("Origin", "https://evil.example")), allowed) is False
    assert origin_allowed(headers(("Origin", "null")), allowed) is False
