"""NodeStatus and StatusBoard: readiness decided once, from the status alone."""

from __future__ import annotations

import dataclasses

import pytest

from broker_node.status import NodeStatus, StatusBoard
from shared.ids import NodeId

NODE = NodeId("n1")


def test_a_fresh_node_is_starting() -> None:
    status = NodeStatus(NODE, standalone=False)
    assert not status.ready
    assert status.unready_reasons == ("bus subscription down", "starting")


def test_a_started_standalone_node_is_ready_without_bus_or_backend() -> None:
    status = NodeStatus(NODE, standalone=True, started=True, backend_up=False)
    assert status.ready
    assert status.unready_reasons == ()


def test_a_cluster_node_is_ready_once_started_subscribed_and_backend_up() -> None:
    status = NodeStatus(NODE, standalone=False, started=True, subscribed=True)
    assert status.ready
    assert not dataclasses.replace(status, backend_up=False).ready


def test_every_reason_is_listed_in_order() -> None:
    status = NodeStatus(NODE, standalone=False, draining=True, backend_up=False)
    assert status.unready_reasons == (
        "draining",
        "cluster backend unavailable",
        "bus subscription down",
        "starting",
    )


def test_status_is_frozen() -> None:
    status = NodeStatus(NODE, standalone=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.started = True  # type: ignore[misc]


def test_the_board_replaces_the_status_and_recomputes_readiness() -> None:
    board = StatusBoard(NodeStatus(NODE, standalone=False))
    before = board()
    board.update(started=True)
    board.on_subscribed(True)
    assert board.current.ready
    assert before.started is False and not before.ready  # an old value never changes
    board.on_backend(False)
    assert board().unready_reasons == ("cluster backend unavailable",)
    board.on_backend(True)
    board.update(draining=True)
    assert board().unready_reasons == ("draining",)
    assert board().node_id == NODE and not board().standalone


def test_reporting_an_unchanged_state_keeps_the_status() -> None:
    board = StatusBoard(NodeStatus(NODE, standalone=False, subscribed=True))
    before = board()
    board.on_backend(True)
    board.on_subscribed(True)
    assert board() is before
