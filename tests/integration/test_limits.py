"""Per-connection limits against real node processes (issue 15 item 3)."""

from __future__ import annotations

from client import BrokerClient
from tests.support.cluster import Cluster, fast_args
from tests.support.nodes import NodeProcess, metric
from tests.support.wire import WireClient


async def test_channels_per_connection_are_capped() -> None:
    with NodeProcess(extra_args=["--max-channels-per-connection", "3"]) as node:
        async with WireClient(node.url) as opener, WireClient(node.url) as target:
            await opener.register("opener")
            target_id = await target.register("target")
            for _ in range(3):
                await opener.open(target_id)
            refused = await opener.request("open", targetId=target_id)
            assert refused["type"] == "channel_open_failed"
            assert refused["error"] == "Too many channels on this connection"
            assert refused["targetId"] == target_id
            async with WireClient(node.url) as other:
                await other.register("other")
                # The target holds 3 channels too: opening one more to it is refused.
                to_full = await other.request("open", targetId=target_id)
                assert to_full["error"] == "Target connection has too many channels"
        assert await metric(node, "broker_limit_refusals_total", limit="channels") == 2


async def test_a_freed_channel_can_be_opened_again() -> None:
    with NodeProcess(extra_args=["--max-channels-per-connection", "2"]) as node:
        async with WireClient(node.url) as opener, WireClient(node.url) as target:
            await opener.register("opener")
            target_id = await target.register("target")
            first = await opener.open(target_id)
            await opener.open(target_id)
            assert (await opener.request("open", targetId=target_id))["type"] == (
                "channel_open_failed"
            )
            assert (await opener.request("close", channelId=first))["type"] == "channel_closed"
            await opener.open(target_id)


async def test_the_channel_cap_holds_across_nodes(cluster: Cluster) -> None:
    args = ["--max-channels-per-connection", "2"]
    node0, node1 = await cluster.start(2, args=[*fast_args(), *args])
    opener = await cluster.client(node0, "opener")
    target = await cluster.client(node1, "target")
    assert target.connection_id is not None
    # Opens in flight count: sent back to back, only two succeed.
    for n in range(4):
        await opener.send({"type": "open", "id": 100 + n, "targetId": target.connection_id})
    replies = [await opener.reply_to(100 + n) for n in range(4)]
    assert [r["type"] for r in replies].count("channel_opened") == 2
    # The target's node refuses a third channel to its client from anyone.
    other = await cluster.client(node0, "other")
    refused = await other.request("open", targetId=target.connection_id)
    assert refused["error"] == "Target connection has too many channels"


async def test_list_by_role_pages_are_capped_sorted_and_complete() -> None:
    with NodeProcess(extra_args=["--max-list-page", "3"]) as node:
        clients = [await WireClient(node.url).__aenter__() for _ in range(8)]
        try:
            ids = sorted([await client.register("member") for client in clients])
            asker = clients[0]
            first = await asker.request("list_by_role", role="member")
            assert first["ids"] == ids[:3] and first["more"] is True
            second = await asker.request("list_by_role", role="member", after=ids[2])
            assert second["ids"] == ids[3:6] and second["more"] is True
            last = await asker.request("list_by_role", role="member", after=ids[5])
            # The last page says nothing more: the README's reply exactly.
            assert last["ids"] == ids[6:] and "more" not in last
            small = await asker.request("list_by_role", role="member", limit=1)
            assert small["ids"] == ids[:1] and small["more"] is True
            bad = await asker.request("list_by_role", role="member", limit=0)
            assert bad["type"] == "list_by_role_failed" and "limit" in bad["error"]

            # The SDK pages through transparently.
            async with BrokerClient(node.url, "sdk") as sdk:
                assert await sdk.list_by_role("member") == ids
        finally:
            for client in clients:
                await client.close()


async def test_a_role_below_the_page_size_gets_the_readme_reply() -> None:
    with NodeProcess() as node:
        async with WireClient(node.url) as client:
            me = await client.register("solo")
            reply = await client.request("list_by_role", role="solo")
            assert set(reply) == {"type", "id", "replyTo", "ids"} and reply["ids"] == [me]


async def test_large_list_replies_weigh_more_against_the_request_rate() -> None:
    # 20 plain requests stay within a burst of 40; 20 lists of 100 ids weigh 60 and do not.
    with NodeProcess(extra_args=["--max-requests-per-second", "20"]) as node:
        members = [await WireClient(node.url).__aenter__() for _ in range(100)]
        try:
            for member in members:
                await member.register("member")
            asker = members[0]
            for _ in range(20):
                await asker.request("ping-like-unknown-type")
            assert await metric(node, "broker_limit_refusals_total", limit="requests_rate") == 0
            for _ in range(20):
                reply = await asker.request("list_by_role", role="member", timeout=30)
                assert len(reply["ids"]) == 100
            assert await metric(node, "broker_limit_refusals_total", limit="requests_rate") >= 1
        finally:
            for member in members:
                await member.close()
