"""Soak: churn, traffic and abuse together for N minutes against nodes this script starts.

    .venv/bin/python -m scripts.soak --minutes 30 --nodes 3

It starts its own ``redis-server`` (on a free port, never 6379) and ``broker-node`` processes,
then runs, all at once:

- churn: clients that connect, register, list, open a channel, send, close and leave;
- traffic: long-lived pairs (across nodes when there are several) exchanging confirmed
  messages without pause;
- abuse: silent and half-open sockets, headers dripped byte by byte, oversized headers,
  pipelined HTTP, deeply nested and odd JSON, binary frames, a channel-cap and a
  list_by_role flood, request floods over the rate limit.

Each node's RSS, open file descriptors and asyncio tasks, and the Redis key count, are taken
after a warm-up and again at the end, once the abuse has stopped and things have settled, with
the same long-lived pairs connected: flat numbers mean nothing leaks. Not run in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from redis.asyncio import Redis

from tests.support.cluster import Cluster
from tests.support.nodes import NodeProcess, metric
from tests.support.raw_ws import RawClient, client_frame, handshake_request, text
from tests.support.redis_server import RedisServer
from tests.support.wire import WireClient

ABUSE_NODE_ARGS = [
    "--handshake-timeout", "2",
    "--max-channels-per-connection", "200",
    "--max-requests-per-second", "2000",
    "--ping-interval", "5",
    "--ping-timeout", "5",
]  # fmt: skip


@dataclass
class Sample:
    rss_kib: list[int]
    fds: list[int]
    tasks: list[int]
    redis_keys: int


@dataclass
class Counts:
    churned: int = 0
    messages: int = 0
    abuses: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    def failed(self, what: str) -> None:
        self.failures[what] = self.failures.get(what, 0) + 1


def proc_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else 0


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def sample(nodes: list[NodeProcess], redis: Redis) -> Sample:
    tasks = [int(await metric(node, "broker_asyncio_tasks")) for node in nodes]
    return Sample(
        rss_kib=[proc_rss_kib(node.pid) for node in nodes],
        fds=[proc_fds(node.pid) for node in nodes],
        tasks=tasks,
        redis_keys=int(await redis.dbsize()),
    )


# --- the workload -----------------------------------------------------------------------------


async def traffic(
    a: WireClient, b: WireClient, channel: str, stop: asyncio.Event, counts: Counts
) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        request_id = 1_000_000 + n
        await a.send(
            {"type": "message", "id": request_id, "channelId": channel, "payload": {"n": n}}
        )
        reply = await a.reply_to(request_id, timeout=30)
        if reply["type"] == "channel_message_sent":
            counts.messages += 1
        else:
            counts.failed("traffic:" + reply.get("error", "?"))
        a.received.clear()
        b.received.clear()
        with contextlib.suppress(TimeoutError):
            while True:
                await b.recv(timeout=0.001)
        b.received.clear()


async def churn(nodes: list[NodeProcess], stop: asyncio.Event, counts: Counts) -> None:
    while not stop.is_set():
        first, second = random.choice(nodes), random.choice(nodes)
        try:
            async with WireClient(first.url) as a, WireClient(second.url) as b:
                await a.register("churn")
                b_id = await b.register("churn-target")
                await a.request("list_by_role", role="churn")
                channel = await a.open(b_id)
                await a.request("message", channelId=channel, payload=[1, 2, 3])
                if random.random() < 0.5:
                    await a.request("close", channelId=channel)
            counts.churned += 1
        except Exception as exc:  # counted and reported; the soak goes on
            counts.failed(f"churn:{type(exc).__name__}")


async def abuse_once(node: NodeProcess, counts: Counts) -> None:
    kind = random.choice(
        [
            "silent",
            "half",
            "drip",
            "big_headers",
            "pipelined",
            "deep",
            "odd",
            "binary",
            "channels",
            "list_flood",
            "flood",
        ]
    )
    port = node.port
    if kind in ("silent", "half", "drip", "big_headers", "pipelined"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            request = handshake_request(port)
            if kind == "half":
                writer.write(request[:-2])
            elif kind == "drip":
                for byte in request[:40]:
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.1)
            elif kind == "big_headers":
                writer.write(request[:-2] + b"X-Pad: " + b"a" * 40_000 + b"\r\n\r\n")
            elif kind == "pipelined":
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(10):
                    await reader.read()
        finally:
            writer.close()
    else:
        client = await RawClient.connect(port)
        try:
            await client.request({"type": "register", "id": 1, "role": "abuser"})
            if kind == "deep":
                depth = random.choice([65, 300, 985, 5000])
                frame = (
                    '{"type":"message","id":2,"channelId":"x","payload":'
                    + "[" * depth
                    + "]" * depth
                    + "}"
                )
                await client.write(text(frame))
            elif kind == "odd":
                for payload in ("1e400", '"\\ud800"', "1" * 4301):
                    await client.write(
                        text('{"type":"message","id":3,"channelId":"x","payload":' + payload + "}")
                    )
            elif kind == "binary":
                await client.write(client_frame(b"\x00\x01", opcode=0x2))
            elif kind == "channels":
                target = await RawClient.connect(port)
                reply = await target.request({"type": "register", "id": 1, "role": "abuse-target"})
                for n in range(250):
                    await client.write(
                        text({"type": "open", "id": 10 + n, "targetId": reply["connectionId"]})
                    )
                await asyncio.sleep(1)
                await target.aclose()
            elif kind == "list_flood":
                for n in range(200):
                    await client.write(
                        text({"type": "list_by_role", "id": 10 + n, "role": "churn-target"})
                    )
            elif kind == "flood":
                await client.write(
                    b"".join(
                        text({"type": "close", "id": 10 + n, "channelId": "x"}) for n in range(5000)
                    )
                )
            with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                async with asyncio.timeout(2):
                    while await client.reader.read(65536):
                        pass
        finally:
            await client.aclose()
    counts.abuses += 1


async def abuse(nodes: list[NodeProcess], stop: asyncio.Event, counts: Counts) -> None:
    while not stop.is_set():
        try:
            await abuse_once(random.choice(nodes), counts)
        except Exception as exc:  # counted and reported; the soak goes on
            counts.failed(f"abuse:{type(exc).__name__}")


async def soak(
    minutes: float, node_count: int, pairs: int, churners: int, abusers: int
) -> dict[str, object]:
    with RedisServer() as redis_server, Cluster(redis_server, args=ABUSE_NODE_ARGS) as cluster:
        nodes = await cluster.start(node_count)
        redis = Redis.from_url(redis_server.url)
        counts = Counts()
        try:
            long_lived = []
            for n in range(pairs):
                a = await WireClient(nodes[n % node_count].url).__aenter__()
                b = await WireClient(nodes[(n + 1) % node_count].url).__aenter__()
                await a.register("pair-a")
                b_id = await b.register("pair-b")
                channel = await a.open(b_id)
                long_lived.append((a, b, channel))
            stop = asyncio.Event()
            workers = [
                asyncio.create_task(traffic(a, b, ch, stop, counts)) for a, b, ch in long_lived
            ]
            workers += [asyncio.create_task(churn(nodes, stop, counts)) for _ in range(churners)]
            abuse_stop = asyncio.Event()
            abusers_tasks = [
                asyncio.create_task(abuse(nodes, abuse_stop, counts)) for _ in range(abusers)
            ]
            warmup = min(30.0, minutes * 60 / 6)
            await asyncio.sleep(warmup)
            start = await sample(nodes, redis)
            print("start", json.dumps(asdict(start)), flush=True)
            deadline = time.monotonic() + minutes * 60 - warmup
            while (left := deadline - time.monotonic()) > 0:
                await asyncio.sleep(min(60.0, left))
                print(
                    f"{time.strftime('%H:%M:%S')} churned={counts.churned} "
                    f"messages={counts.messages} abuses={counts.abuses} "
                    f"failures={counts.failures}",
                    flush=True,
                )
            # Stop churn and abuse; let timeouts, keepalives and the registry settle; keep the
            # long-lived pairs talking so that the end sample sees the same steady state.
            abuse_stop.set()
            await asyncio.gather(*abusers_tasks, return_exceptions=True)
            churn_tasks = workers[pairs:]
            for task in churn_tasks:
                task.cancel()
            await asyncio.gather(*churn_tasks, return_exceptions=True)
            await asyncio.sleep(15)
            end = await sample(nodes, redis)
            print("end", json.dumps(asdict(end)), flush=True)
            stop.set()
            await asyncio.gather(*workers[:pairs], return_exceptions=True)
            logs = [node.output() for node in nodes]
            return {
                "minutes": minutes,
                "nodes": node_count,
                "start": asdict(start),
                "end": asdict(end),
                "churned": counts.churned,
                "messages": counts.messages,
                "abuses": counts.abuses,
                "failures": counts.failures,
                "tracebacks": sum(log.count("Traceback") for log in logs),
            }
        finally:
            await redis.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--nodes", type=int, choices=[1, 3], default=3)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--churners", type=int, default=8)
    parser.add_argument("--abusers", type=int, default=4)
    args = parser.parse_args()
    result = asyncio.run(soak(args.minutes, args.nodes, args.pairs, args.churners, args.abusers))
    print(json.dumps(result, indent=2))
    start, end = result["start"], result["end"]
    assert isinstance(start, dict) and isinstance(end, dict)
    print("\nmetric        start -> end (per node)")
    for key in ("rss_kib", "fds", "tasks"):
        print(f"{key:12}  {start[key]} -> {end[key]}")
    print(f"{'redis_keys':12}  {start['redis_keys']} -> {end['redis_keys']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
