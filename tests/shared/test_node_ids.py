"""Node ids: a configured name plus an incarnation per start."""

from __future__ import annotations

from shared.ids import NodeId, incarnation_id, new_node_id, node_name


def test_each_start_of_a_name_gets_its_own_id_and_keeps_the_name() -> None:
    first, second = incarnation_id("pod-a"), incarnation_id("pod-a")
    assert first != second
    assert node_name(first) == node_name(second) == "pod-a"


def test_a_name_with_the_separator_keeps_it() -> None:
    assert node_name(incarnation_id("a~b")) == "a~b"


def test_an_id_without_incarnation_is_its_own_name() -> None:
    random_id = new_node_id()
    assert node_name(random_id) == random_id
    assert node_name(NodeId("plain")) == "plain"
