"""Placing pairs on broker URLs and splitting the load across processes (pure)."""

from __future__ import annotations

from typing import Literal, TypeVar

__all__ = ["Placement", "place_idle", "place_pairs", "split"]

Placement = Literal["same-node", "cross-node"]

T = TypeVar("T")


def place_pairs(urls: list[str], pairs: int, placement: Placement) -> list[tuple[str, str]]:
    """(sender URL, receiver URL) of each pair.

    ``same-node``: pair i has both ends on ``urls[i % n]``. ``cross-node``: the sender is on
    ``urls[i % n]`` and the receiver on the next URL, ``urls[(i + 1) % n]``.
    """
    if not urls:
        raise ValueError("at least one URL is needed")
    n = len(urls)
    if placement == "cross-node" and n < 2:
        raise ValueError("cross-node placement needs at least two URLs")
    step = 1 if placement == "cross-node" else 0
    return [(urls[i % n], urls[(i + step) % n]) for i in range(pairs)]


def place_idle(urls: list[str], count: int) -> list[str]:
    """Idle connections spread round-robin over the URLs."""
    return [urls[i % len(urls)] for i in range(count)]


def split(items: list[T], parts: int) -> list[list[T]]:
    """Deal ``items`` into ``parts`` lists as evenly as possible (sizes differ by at most 1)."""
    if parts < 1:
        raise ValueError("parts must be at least 1")
    return [items[k::parts] for k in range(parts)]
