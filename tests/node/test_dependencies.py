"""What the node needs of websockets and redis-py: these fail loudly on a release that changes
it, before any client notices."""

from __future__ import annotations

import os

import pytest
from websockets.frames import CloseCode
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from broker_node.frame_scanner import unmask, xor_mask


@pytest.mark.parametrize("size", [*range(10), 125, 126, 200, 65535, 65536, 1 << 20])
def test_our_unmask_is_rfc_6455_masking(size: int) -> None:
    payload, mask = os.urandom(size), os.urandom(4)
    expected = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    assert xor_mask(payload, mask) == expected
    assert xor_mask(bytearray(payload), bytearray(mask)) == expected
    assert unmask(payload, mask) == expected


def test_the_fast_path_still_unmasks_in_c() -> None:
    # websockets.speedups is not public: when a release drops or changes it, the scanner
    # falls back to xor_mask (correct, but about 7 % more CPU per message): say so here.
    from websockets.speedups import apply_mask

    assert unmask is apply_mask


def test_the_public_protocol_attributes_the_connection_reads() -> None:
    ws = ServerProtocol(max_size=1024)
    assert ws.close_sent is None and ws.extensions == []
    assert ws.state is not OPEN
    assert int(CloseCode.MESSAGE_TOO_BIG) == 1009


def test_redis_py_parses_urls_as_the_bus_reads_them() -> None:
    # The bus opens its own sockets from what parse_url says (broker_node/cluster/endpoint.py).
    from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

    assert parse_url("redis://u:p@h:1/2") == {
        "username": "u",
        "password": "p",
        "host": "h",
        "port": 1,
        "db": 2,
    }
    assert parse_url("rediss://h")["connection_class"] is SSLConnection
    unix = parse_url("unix:///s.sock?db=1")
    assert unix["connection_class"] is UnixDomainSocketConnection and unix["path"] == "/s.sock"
