"""The role policy: deny by default, claims narrow the file, accept rules, wildcards."""

from __future__ import annotations

import pytest

from broker_node.auth.identity import Identity
from broker_node.auth.policy import (
    Policy,
    PolicyError,
    grants_for,
    may_list,
    may_open,
    may_register,
    parse_policy,
)

POLICY = parse_policy(
    """
    [roles.mcp-server]
    list = ["browser-tab"]
    open = ["browser-tab", "service"]

    [roles.browser-tab]
    accept = ["mcp-server"]

    [roles.service]
    list = ["*"]
    open = ["*"]
    """
)


def identity(roles: set[str], **kwargs: frozenset[str]) -> Identity:
    return Identity(subject="u", roles=frozenset(roles), **kwargs)  # type: ignore[arg-type]


def test_register_only_as_a_role_of_the_token() -> None:
    assert may_register(identity({"a"}), "a")
    assert not may_register(identity({"a"}), "b")
    assert not may_register(identity(set()), "a")
    assert may_register(identity({"*"}), "anything")


def test_a_role_missing_from_the_file_may_do_nothing() -> None:
    grants = grants_for(POLICY, identity({"stranger"}), "stranger")
    assert not may_list(grants, "browser-tab")
    assert not may_open(POLICY, grants, "stranger", "browser-tab")


def test_file_grants_list_and_open() -> None:
    grants = grants_for(POLICY, identity({"mcp-server"}), "mcp-server")
    assert may_list(grants, "browser-tab")
    assert not may_list(grants, "service")
    assert may_open(POLICY, grants, "mcp-server", "browser-tab")
    assert may_open(POLICY, grants, "mcp-server", "service")
    assert not may_open(POLICY, grants, "mcp-server", "mcp-server")


def test_accept_rule_of_the_target_role() -> None:
    # service may open to every role, but browser tabs accept only mcp-server.
    grants = grants_for(POLICY, identity({"service"}), "service")
    assert may_open(POLICY, grants, "service", "mcp-server")
    assert not may_open(POLICY, grants, "service", "browser-tab")


def test_token_claims_narrow_the_file_never_widen_it() -> None:
    narrowed = grants_for(
        POLICY, identity({"mcp-server"}, may_open=frozenset({"service"})), "mcp-server"
    )
    assert not may_open(POLICY, narrowed, "mcp-server", "browser-tab")
    assert may_open(POLICY, narrowed, "mcp-server", "service")
    widened = grants_for(POLICY, identity({"mcp-server"}, may_list=frozenset({"*"})), "mcp-server")
    assert may_list(widened, "browser-tab") and not may_list(widened, "service")
    wildcard_file = grants_for(POLICY, identity({"service"}, may_list=frozenset({"x"})), "service")
    assert may_list(wildcard_file, "x") and not may_list(wildcard_file, "y")


def test_without_a_file_claims_alone_grant_and_absence_denies() -> None:
    none = grants_for(None, identity({"a"}), "a")
    assert not may_list(none, "a") and not may_open(None, none, "a", "a")
    some = grants_for(
        None, identity({"a"}, may_list=frozenset({"b"}), may_open=frozenset({"b"})), "a"
    )
    assert may_list(some, "b") and may_open(None, some, "a", "b")
    assert not may_list(some, "c")


@pytest.mark.parametrize(
    "text",
    [
        "roles = 1",
        "[roles]\na = 1",
        "[roles.a]\nlist = 'b'",
        "[roles.a]\nopen = [1]",
        "[roles.a]\nwrite = []",
        "[other]\n",
        "not toml [",
    ],
)
def test_bad_policy_files_are_named(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


def test_an_empty_file_denies_everything() -> None:
    assert parse_policy("") == Policy()
