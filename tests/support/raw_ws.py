"""A WebSocket client that writes frames byte for byte as a test builds them.

``WireClient`` goes through a WebSocket library, which only ever sends well-formed frames in
its own layout. Tests of the node's frame parsing need the rest: several frames in one write,
a frame cut anywhere, every length encoding, reserved bits, unmasked frames, invalid UTF-8.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

DEFAULT_MASK = b"\x37\xfa\x21\x3d"


def client_frame(
    payload: bytes,
    *,
    opcode: int = OP_TEXT,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = DEFAULT_MASK,
    length_bytes: int | None = None,
) -> bytes:
    """One client frame. ``rsv`` holds RSV1-3 as bits 0b100, 0b010, 0b001; ``mask=None``
    leaves it unmasked; ``length_bytes`` (0, 2 or 8) forces a length encoding, even one longer
    than needed."""
    length = len(payload)
    if length_bytes is None:
        length_bytes = 0 if length < 126 else 2 if length < 65536 else 8
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if mask is not None else 0
    if length_bytes == 0:
        header = bytes([first, mask_bit | length])
    elif length_bytes == 2:
        header = bytes([first, mask_bit | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([first, mask_bit | 127]) + length.to_bytes(8, "big")
    if mask is None:
        return header + payload
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return header + mask + masked


def text(value: dict[str, Any] | str | bytes, **kwargs: Any) -> bytes:
    """A text frame carrying JSON (a dict), a string, or raw bytes as they are."""
    if isinstance(value, dict):
        value = json.dumps(value)
    data = value.encode() if isinstance(value, str) else value
    return client_frame(data, **kwargs)


def handshake_request(port: int) -> bytes:
    return (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class RawClient:
    """Raw bytes out; the node's (unmasked, unfragmented) frames in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        #: Payloads of the pongs met while waiting for text frames, in order.
        self.pongs: list[bytes] = []

    @classmethod
    async def connect(
        cls, port: int, *, after_request: bytes = b"", sock: socket.socket | None = None
    ) -> RawClient:
        """Open a WebSocket (on ``sock`` when given, already connected); ``after_request`` is
        written in the same write as the request."""
        if sock is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        else:
            reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(handshake_request(port) + after_request)
        async with asyncio.timeout(5):
            response = await reader.readuntil(b"\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 101 "), response
        return cls(reader, writer)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next frame from the node: opcode and payload."""
        async with asyncio.timeout(timeout):
            first, second = await self.reader.readexactly(2)
            length = second & 0x7F
            if length == 126:
                length = int.from_bytes(await self.reader.readexactly(2), "big")
            elif length == 127:
                length = int.from_bytes(await self.reader.readexactly(8), "big")
            assert not second & 0x80, "server frames are not masked"
            assert first & 0x80, "the node does not fragment"
            return first & 0x0F, await self.reader.readexactly(length)

    async def json(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next text frame, decoded; pongs met on the way go to ``pongs``."""
        while True:
            opcode, payload = await self.frame(timeout)
            if opcode == OP_PONG:
                self.pongs.append(payload)
                continue
            assert opcode == OP_TEXT, (opcode, payload)
            value: dict[str, Any] = json.loads(payload)
            return value

    async def request(self, value: dict[str, Any]) -> dict[str, Any]:
        await self.write(text(value))
        return await self.json()

    async def close_code(self, timeout: float = 5.0) -> int | None:
        """Skip frames until the node's close frame; its code (None: the TCP closed first)."""
        try:
            while True:
                opcode, payload = await self.frame(timeout)
                if opcode == OP_CLOSE:
                    return int.from_bytes(payload[:2], "big")
        except asyncio.IncompleteReadError:
            return None

    async def at_eof(self, timeout: float = 5.0) -> bool:
        """True once the node has closed the TCP connection (whatever came before)."""
        async with asyncio.timeout(timeout):
            while await self.reader.read(65536):
                pass
        return True

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
