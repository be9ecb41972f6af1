"""The bus's hand-driven Redis connection, without Redis: bytes in, replies out, faults."""

from __future__ import annotations

import asyncio

import pytest

from broker_node.cluster.endpoint import RedisEndpoint
from broker_node.cluster.resp import Reply, RespLink, command, open_link
from broker_node.errors import BackendUnavailable, ConfigurationError
from tests.support.ports import free_port


class FakeTransport:
    """What a link does to its socket."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> object:
        return None

    def is_closing(self) -> bool:
        return self.aborted or self.closed


def connected_link() -> tuple[RespLink, list[Reply], FakeTransport]:
    replies: list[Reply] = []
    link = RespLink("test link", replies.append)
    transport = FakeTransport()
    link.connection_made(transport)  # type: ignore[arg-type]
    return link, replies, transport


def test_command_is_resp() -> None:
    assert command(b"PUBLISH", b"ch", b"") == b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$0\r\n\r\n"


async def test_replies_are_parsed_across_and_within_reads() -> None:
    link, replies, _ = connected_link()
    stream = b":1\r\n*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n:0\r\n"
    for cut in range(len(stream) + 1):
        replies.clear()
        link.data_received(stream[:cut])
        link.data_received(stream[cut:])
        assert replies == [1, [b"message", b"ch", b"hello"], 0], cut
    assert link.open and link.saw_traffic


async def test_an_error_reply_drops_the_connection() -> None:
    link, replies, transport = connected_link()
    link.data_received(b":1\r\n-NOAUTH Authentication required.\r\n:2\r\n")
    assert replies == [1]  # nothing after the error is believed
    assert transport.aborted and not link.open
    lost = await link.lost
    assert isinstance(lost, BackendUnavailable)
    assert "NOAUTH" in str(lost)


async def test_unparsable_data_drops_the_connection() -> None:
    link, replies, transport = connected_link()
    link.data_received(b"?what\r\n")
    assert replies == [] and transport.aborted
    assert "protocol error" in str(await link.lost)
    link.data_received(b":1\r\n")  # a late read after the loss is ignored
    assert replies == []


async def test_eof_and_loss_resolve_lost_once() -> None:
    link, _, _ = connected_link()
    link.eof_received()
    link.connection_lost(None)
    assert "closed by Redis" in str(await link.lost)
    link.write(b"ignored")  # writing to a lost link does nothing


async def test_writes_and_backpressure() -> None:
    woken: list[bool] = []
    link = RespLink("test link", lambda reply: None, on_writable=lambda: woken.append(True))
    transport = FakeTransport()
    link.connection_made(transport)  # type: ignore[arg-type]
    link.write(b"one")
    link.pause_writing()
    assert link.writing_paused
    link.resume_writing()
    assert not link.writing_paused and woken == [True]
    link.close()
    assert transport.closed and transport.written == [b"one"]


async def test_no_endpoint_is_refused() -> None:
    # A backend on fakeredis pools has no socket for the bus to open.
    link = RespLink("test link", lambda reply: None)
    with pytest.raises(ConfigurationError):
        await open_link(None, link)


async def test_an_unreachable_redis_is_backend_unavailable() -> None:
    link = RespLink("test link", lambda reply: None)
    with pytest.raises(BackendUnavailable):
        async with asyncio.timeout(5):
            await open_link(RedisEndpoint(host="127.0.0.1", port=free_port()), link)


async def test_a_link_closed_before_it_connected_is_lost() -> None:
    link = RespLink("test link", lambda reply: None)
    link.close()
    assert not link.open
    assert "closed" in str(await link.lost)


async def test_replies_after_the_callback_dropped_the_link_are_not_delivered() -> None:
    replies: list[Reply] = []

    def first_only(reply: Reply) -> None:
        replies.append(reply)
        link.abort("enough")

    link = RespLink("test link", first_only)
    transport = FakeTransport()
    link.connection_made(transport)  # type: ignore[arg-type]
    link.data_received(b":1\r\n:2\r\n")
    assert replies == [1] and transport.aborted
    assert "enough" in str(await link.lost)


async def test_unparsable_data_before_the_transport_is_known_still_loses_the_link() -> None:
    link = RespLink("test link", lambda reply: None)
    link.data_received(b"?what\r\n")
    assert "protocol error" in str(await link.lost)


async def test_a_handshake_cut_short_aborts_the_link() -> None:
    # A server that accepts and never answers: the AUTH reply never comes.
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    link = RespLink("test link", lambda reply: None)
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await open_link(RedisEndpoint(host="127.0.0.1", port=port, password="pw"), link)
        assert "handshake cut short" in str(await link.lost)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
