"""A tiny TCP load balancer for the reconnect tests: one address in front of several nodes.

Each new connection goes to the first backend, in order, that accepts a TCP connection, as a
load balancer with health-based failover would send it. Bytes are piped both ways; when
either side closes, so does the other. This is what a client behind nginx sees when the node
it was on dies: its connection drops, and the next one lands on a live node.
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.ports import free_port


class FailoverProxy:
    def __init__(self, backends: list[int]) -> None:
        self.backends = list(backends)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        #: Backend port of each accepted connection, in order.
        self.routed: list[int] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> FailoverProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FailoverProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            for port in self.backends:
                try:
                    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    continue
                self.routed.append(port)
                try:
                    await asyncio.gather(
                        self._pipe(reader, up_writer), self._pipe(up_reader, writer)
                    )
                finally:
                    up_writer.close()
                    with contextlib.suppress(OSError):
                        await up_writer.wait_closed()
                return
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._pipes.discard(task)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            # Either direction ending ends the connection, as a dead node's RST does.
            sink.close()
