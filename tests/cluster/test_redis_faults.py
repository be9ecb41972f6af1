"""The Redis backend under faults: a killed, paused (SIGSTOP) and restarted redis-server.

Every call must fail with BackendUnavailable within about the request timeout (never hang),
a subscription must end with BackendUnavailable when its connection is lost, and everything
must work again once Redis is back, even empty.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis

from broker_node.cluster.base import Backend, Heartbeat, PublishResult, publish
from broker_node.cluster.redis import RedisBackend
from broker_node.errors import BackendUnavailable
from shared.ids import NodeId
from tests.cluster.harness import (
    LONG_TTL_MS,
    A,
    B,
    channel,
    connection,
    listen,
    receive,
    settings_for,
)
from tests.support.polling import wait_until
from tests.support.redis_server import RedisServer

TIMEOUT = 0.3
#: A call may take its request timeout, plus scheduling noise on a busy CI machine.
BOUND = 2 * TIMEOUT + 0.5


@pytest.fixture
async def backend(redis_server: RedisServer) -> AsyncIterator[Backend]:
    made = RedisBackend(settings_for(redis_server.url, request_timeout=TIMEOUT))
    try:
        yield made
    finally:
        await made.aclose()


def every_call(backend: Backend) -> dict[str, Callable[[], Awaitable[object]]]:
    registry, bus = backend.registry, backend.bus
    a, b = connection(A), connection(B)
    chan = channel(a, b)

    async def subscribe() -> None:
        async with bus.subscribe(NodeId("listener"), lambda payload: None):
            pass

    return {
        "add_connection": lambda: registry.add_connection(a),
        "remove_connection": lambda: registry.remove_connection(a),
        "find_connection": lambda: registry.find_connection(a.connection_id),
        "list_by_role": lambda: registry.list_by_role("worker"),
        "add_channel": lambda: registry.add_channel(chan),
        "remove_channel": lambda: registry.remove_channel(chan),
        "heartbeat": lambda: registry.heartbeat(A, LONG_TTL_MS),
        "rejoin": lambda: registry.rejoin(A, LONG_TTL_MS),
        "live_nodes": registry.live_nodes,
        "lapsed_nodes": registry.lapsed_nodes,
        "reap": lambda: registry.reap(B),
        "leave": lambda: registry.leave(B),
        "restore": lambda: registry.restore(A, [a], [chan]),
        "ping": registry.ping,
        "publish": lambda: publish(bus, [(B, b"x")]),
        "subscribe": subscribe,
    }


async def timed(call: Callable[[], Awaitable[object]]) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        await call()
    except Exception as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


async def assert_every_call_fails_fast(backend: Backend) -> None:
    calls = every_call(backend)
    async with asyncio.timeout(5 * BOUND):  # a hang fails the test instead of stalling it
        outcomes = await asyncio.gather(*(timed(call) for call in calls.values()))
    for name, (error, elapsed) in zip(calls, outcomes, strict=True):
        assert isinstance(error, BackendUnavailable), (name, error)
        assert elapsed < BOUND, (name, elapsed)


async def assert_every_call_works(backend: Backend) -> None:
    for name, call in every_call(backend).items():
        error, _ = await timed(call)
        assert error is None, (name, error)


async def test_every_call_fails_fast_while_killed_and_works_after_restart(
    redis_server: RedisServer, backend: Backend
) -> None:
    await assert_every_call_works(backend)  # the pools hold connections that are about to die
    redis_server.kill()
    await assert_every_call_fails_fast(backend)
    await assert_every_call_fails_fast(backend)  # and again, with no connection left

    redis_server.start()  # same port, empty, no scripts loaded
    await assert_every_call_works(backend)
    assert await backend.registry.heartbeat(B, LONG_TTL_MS) is Heartbeat.REJOINED


async def test_every_call_fails_within_the_timeout_while_paused(
    redis_server: RedisServer, backend: Backend
) -> None:
    await assert_every_call_works(backend)
    redis_server.pause()
    try:
        await assert_every_call_fails_fast(backend)
    finally:
        redis_server.resume()
    await assert_every_call_works(backend)


async def test_subscription_raises_when_the_server_is_killed(
    redis_server: RedisServer, backend: Backend
) -> None:
    async with listen(backend.bus, A) as subscription:
        assert await publish(backend.bus, [(A, b"before")]) == [1]
        async with asyncio.timeout(BOUND):
            assert await receive(subscription, 1) == [b"before"]
        redis_server.kill()
        with pytest.raises(BackendUnavailable):
            async with asyncio.timeout(BOUND):
                await subscription.subscription.wait_lost()

    redis_server.start()
    async with listen(backend.bus, A) as subscription:  # what a supervisor does next
        assert await publish(backend.bus, [(A, b"after")]) == [1]
        async with asyncio.timeout(BOUND):
            assert await receive(subscription, 1) == [b"after"]


async def test_idle_subscription_notices_a_paused_server(
    redis_server: RedisServer, backend: Backend
) -> None:
    async with listen(backend.bus, A) as subscription:
        redis_server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                async with asyncio.timeout(3 * BOUND):
                    await receive(subscription, 1)
            # An idle read waits one timeout, then its PING another.
            assert time.monotonic() - started < 2 * TIMEOUT + BOUND
        finally:
            redis_server.resume()


async def test_closing_the_backend_ends_a_live_subscription(backend: Backend) -> None:
    async with listen(backend.bus, A) as subscription:
        receiving = asyncio.create_task(receive(subscription, 1))
        await backend.aclose()
        with pytest.raises(BackendUnavailable):
            async with asyncio.timeout(BOUND):
                await receiving


async def test_password_from_the_url() -> None:
    with RedisServer(password="s3cret") as redis_server:
        good = RedisBackend(settings_for(redis_server.url, request_timeout=TIMEOUT))
        wrong = RedisBackend(
            settings_for(redis_server.url.replace("s3cret", "wrong"), request_timeout=TIMEOUT)
        )
        try:
            await good.registry.ping()
            await assert_every_call_works(good)
            with pytest.raises(BackendUnavailable):
                await wrong.registry.ping()
            with pytest.raises(BackendUnavailable):
                await publish(wrong.bus, [(A, b"x")])
            with pytest.raises(BackendUnavailable):
                async with wrong.bus.subscribe(A, lambda payload: None):
                    pass
        finally:
            await good.aclose()
            await wrong.aclose()


async def test_publisher_reconnects_after_redis_drops_its_connection(
    redis_server: RedisServer, backend: Backend
) -> None:
    admin = Redis.from_url(redis_server.url)
    try:
        async with listen(backend.bus, A) as subscription:
            assert await publish(backend.bus, [(A, b"before")]) == [1]
            # Drops every connection but the subscriber's (the publisher's included).
            await admin.client_kill_filter(_type="normal", skipme=True)
            assert await publish(backend.bus, [(A, b"after")]) == [1]
            async with asyncio.timeout(BOUND):
                assert await receive(subscription, 2) == [b"before", b"after"]
    finally:
        await admin.aclose()


async def test_sends_in_flight_to_a_hung_redis_fail_in_order_after_one_timeout(
    redis_server: RedisServer, backend: Backend
) -> None:
    assert await publish(backend.bus, [(B, b"warm")]) == [0]  # the connection is up
    outcomes: list[tuple[int, object]] = []

    def record(n: int) -> PublishResult:
        return lambda result: outcomes.append((n, result))

    redis_server.pause()
    try:
        started = time.monotonic()
        for n in range(3):
            backend.bus.send([(B, b"%d" % n)], record(n))

        async def all_reported() -> bool:
            return len(outcomes) == 3

        await wait_until(all_reported, timeout=3 * BOUND, message="three outcomes reported")
        assert time.monotonic() - started < BOUND
    finally:
        redis_server.resume()
    assert [n for n, _ in outcomes] == [0, 1, 2]
    assert all(isinstance(result, BackendUnavailable) for _, result in outcomes)
    # A fresh connection serves the next send.
    assert await publish(backend.bus, [(B, b"later")]) == [0]


async def test_sends_after_the_backend_closed_fail(backend: Backend) -> None:
    assert await publish(backend.bus, [(B, b"x")]) == [0]
    await backend.aclose()
    with pytest.raises(BackendUnavailable):
        await publish(backend.bus, [(B, b"y")])


async def test_a_first_send_to_a_hung_redis_fails_within_the_timeout(
    redis_server: RedisServer, backend: Backend
) -> None:
    # No publisher connection yet: the handshake itself gets no answer.
    redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await publish(backend.bus, [(B, b"x")])
        assert time.monotonic() - started < BOUND
    finally:
        redis_server.resume()
    assert await publish(backend.bus, [(B, b"y")]) == [0]
