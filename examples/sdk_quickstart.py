"""Two clients, discovery by role, a channel, and a request/response exchange.

Run it against a broker node, or the load balancer in front of a cluster:

    python examples/sdk_quickstart.py ws://localhost:3004
"""

import asyncio
import sys

from client import BrokerClient, Channel


async def serve(channel: Channel) -> None:
    """The calculator's side of a channel: answer every question until the channel closes."""
    async for question in channel:
        await channel.send({"sum": question["a"] + question["b"]})


async def main(url: str) -> None:
    async with (
        # An async callback runs as a task that the client tracks and cancels on close().
        BrokerClient(url, "calculator", on_incoming_channel=serve) as calculator,
        BrokerClient(url, "app") as app,
    ):
        print(f"calculator registered as {calculator.connection_id}")

        # Discovery: every connection registered with the role, on every node.
        calculators = await app.list_by_role("calculator")
        print(f"app found {len(calculators)} calculator(s)")

        channel = await app.open_channel(calculators[0])
        print(f"channel {channel.channel_id} open to {channel.peer_id}")

        # send() returns once the broker confirms delivery; request() also awaits the reply.
        answer = await channel.request({"a": 2, "b": 3}, timeout=5.0)
        print(f"2 + 3 = {answer['sum']}")

        await channel.close()
    print("done")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "ws://localhost:3004"))
