"""The node's settings: the values derived from the options."""

from __future__ import annotations

from broker_node.config import Settings


def test_the_unconfirmed_bytes_bound_is_half_the_outbound_buffer_unless_given() -> None:
    assert Settings(max_outbound_buffer=1000).unconfirmed_bytes_bound == 500
    assert (
        Settings(max_outbound_buffer=1000, max_unconfirmed_bytes=10).unconfirmed_bytes_bound == 10
    )


def test_the_bursts_follow_the_rates() -> None:
    settings = Settings(max_requests_per_second=100, max_bytes_per_second=1000, max_message_size=10)
    assert (settings.request_burst, settings.byte_burst) == (200, 2000)
    assert Settings(max_bytes_per_second=1, max_message_size=10).byte_burst == 20


def test_the_node_ttl_in_milliseconds() -> None:
    assert Settings(node_ttl=1.5).node_ttl_ms == 1500


def test_authentication_is_on_with_any_key() -> None:
    assert not Settings().auth_enabled
    assert Settings(auth_secret="s" * 32).auth_enabled
