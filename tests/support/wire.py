"""A raw protocol client for tests: JSON frames in and out, replies matched by replyTo."""

from __future__ import annotations

import asyncio
import json
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

Frame = dict[str, Any]


class WireClient:
    """Speaks the wire protocol directly, with no SDK in between."""

    def __init__(self, url: str, **connect_kwargs: Any) -> None:
        self.url = url
        self._connect_kwargs = connect_kwargs
        self.ws: ClientConnection | None = None
        self.next_id = 1
        self.connection_id: str | None = None
        self.received: list[Frame] = []

    async def __aenter__(self) -> WireClient:
        self.ws = await connect(self.url, max_size=None, **self._connect_kwargs)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()

    async def send(self, frame: Frame | str | bytes) -> None:
        assert self.ws is not None
        await self.ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    async def recv(self, timeout: float = 5.0) -> Frame:
        assert self.ws is not None
        async with asyncio.timeout(timeout):
            frame: Frame = json.loads(await self.ws.recv())
        self.received.append(frame)
        return frame

    async def request(self, kind: str, timeout: float = 5.0, **fields: Any) -> Frame:
        """Send a request and return its reply; notifications met on the way are kept."""
        request_id = self.next_id
        self.next_id += 1
        await self.send({"type": kind, "id": request_id, **fields})
        return await self.reply_to(request_id, timeout)

    async def reply_to(self, request_id: int, timeout: float = 5.0) -> Frame:
        for frame in self.received:
            if frame.get("replyTo") == request_id:
                self.received.remove(frame)
                return frame
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if frame.get("replyTo") == request_id:
                    self.received.remove(frame)
                    return frame

    async def notification(self, kind: str, timeout: float = 5.0) -> Frame:
        """The next unsolicited frame of this type (earlier ones kept are returned first)."""
        for frame in self.received:
            if frame.get("type") == kind and "replyTo" not in frame:
                self.received.remove(frame)
                return frame
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if frame.get("type") == kind and "replyTo" not in frame:
                    self.received.remove(frame)
                    return frame

    async def register(self, role: str) -> str:
        reply = await self.request("register", role=role)
        assert reply["type"] == "registered", reply
        self.connection_id = reply["connectionId"]
        return str(reply["connectionId"])

    async def open(self, target_id: str) -> str:
        reply = await self.request("open", targetId=target_id)
        assert reply["type"] == "channel_opened", reply
        return str(reply["channelId"])

    async def closed_with(self, timeout: float = 5.0) -> tuple[int | None, str | None]:
        """Wait until the server closes the connection; its close code and reason."""
        assert self.ws is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        except ConnectionClosed as exc:
            if exc.rcvd is None:
                return None, None
            return exc.rcvd.code, exc.rcvd.reason
        raise AssertionError("unreachable")


async def pair(url_a: str, url_b: str | None = None) -> tuple[WireClient, WireClient, str]:
    """Two registered clients and a channel from the first to the second."""
    a = await WireClient(url_a).__aenter__()
    b = await WireClient(url_b or url_a).__aenter__()
    await a.register("a")
    b_id = await b.register("b")
    channel = await a.open(b_id)
    incoming = await b.notification("incoming_channel")
    assert incoming["channelId"] == channel
    return a, b, channel
