"""Who may register as, discover and open channels to which roles: a pure decision table.

When authentication is on, everything is denied unless granted:

* **register** as a role: the token's ``roles`` claim must name it.
* **list_by_role** a role: the caller's role must be granted ``list`` of it by the policy file,
  and by the token's ``list`` claim when the token has one (a claim narrows, never widens).
  A role the caller may not list is answered as an empty role.
* **open** a channel to a connection: the caller's role must be granted ``open`` of the target's
  role the same way, and the target's role must ``accept`` the caller's role when the policy
  file gives it an ``accept`` rule. A forbidden target is answered as a missing one.

Without a policy file, the token's ``list``/``open`` claims alone grant. ``"*"`` in any list
means every role. The policy file (TOML)::

    [roles.mcp-server]
    list = ["browser-tab"]
    open = ["browser-tab"]

    [roles.browser-tab]
    list = []
    open = []
    accept = ["mcp-server"]
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from broker_node.auth.identity import Identity

ANY_ROLE: Final = "*"


class PolicyError(ValueError):
    """The policy file is not what this module reads."""


@dataclass(frozen=True, slots=True)
class RoleRule:
    """What connections of one role may do."""

    may_list: frozenset[str] = frozenset()
    may_open: frozenset[str] = frozenset()
    #: Roles allowed to open channels to this role; None: whoever may open to it.
    accepts: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """The policy file's rules by role; absent roles may do nothing."""

    rules: Mapping[str, RoleRule] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Grants:
    """What one registered connection may do: its policy rule narrowed by its token."""

    may_list: frozenset[str]
    may_open: frozenset[str]


def parse_policy(text: str) -> Policy:
    """Read a policy file; ``PolicyError`` names what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"not TOML: {exc}") from exc
    unknown = set(data) - {"roles"}
    if unknown:
        raise PolicyError(f"unknown tables: {sorted(unknown)}")
    roles = data.get("roles", {})
    if not isinstance(roles, dict):
        raise PolicyError("[roles] must be a table of role tables")
    rules: dict[str, RoleRule] = {}
    for role, table in roles.items():
        if not isinstance(table, dict):
            raise PolicyError(f"roles.{role} must be a table")
        extra = set(table) - {"list", "open", "accept"}
        if extra:
            raise PolicyError(f"roles.{role}: unknown keys {sorted(extra)}")
        accepts = _roles(role, "accept", table["accept"]) if "accept" in table else None
        rules[role] = RoleRule(
            may_list=_roles(role, "list", table.get("list", [])),
            may_open=_roles(role, "open", table.get("open", [])),
            accepts=accepts,
        )
    return Policy(rules)


def _roles(role: str, key: str, value: object) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise PolicyError(f"roles.{role}.{key} must be a list of role names")
    return frozenset(value)


def may_register(identity: Identity, role: str) -> bool:
    return _covers(identity.roles, role)


def grants_for(policy: Policy | None, identity: Identity, role: str) -> Grants:
    """What a connection of ``role`` holding ``identity`` may list and open."""
    if policy is None:
        return Grants(identity.may_list or frozenset(), identity.may_open or frozenset())
    rule = policy.rules.get(role, RoleRule())
    return Grants(
        _narrow(rule.may_list, identity.may_list), _narrow(rule.may_open, identity.may_open)
    )


def may_list(grants: Grants, role: str) -> bool:
    return _covers(grants.may_list, role)


def may_open(policy: Policy | None, grants: Grants, opener_role: str, target_role: str) -> bool:
    if not _covers(grants.may_open, target_role):
        return False
    if policy is None:
        return True
    rule = policy.rules.get(target_role)
    accepts = rule.accepts if rule is not None else None
    return accepts is None or _covers(accepts, opener_role)


def _covers(allowed: frozenset[str], role: str) -> bool:
    return role in allowed or ANY_ROLE in allowed


def _narrow(granted: frozenset[str], claim: frozenset[str] | None) -> frozenset[str]:
    """The policy's grant, limited to what the token claims (absent claim: no limit)."""
    if claim is None:
        return granted
    if ANY_ROLE in granted:
        return claim
    if ANY_ROLE in claim:
        return granted
    return granted & claim
