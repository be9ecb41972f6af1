"""What the node says about itself: one frozen value, replaced whole on every change.

The node and its components report changes to a :class:`StatusBoard` (through small
callbacks such as :meth:`StatusBoard.on_subscribed`); /readyz, /metrics and the drain read the
current :class:`NodeStatus`. Readiness is decided here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from shared.ids import NodeId


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """The node's state at one moment. ``ready`` and ``unready_reasons`` follow from the rest."""

    node_id: NodeId
    standalone: bool
    started: bool = False
    draining: bool = False
    subscribed: bool = False
    backend_up: bool = True
    #: Why /readyz answers 503, in the order it lists them; empty when ready.
    unready_reasons: tuple[str, ...] = field(init=False)
    ready: bool = field(init=False)

    def __post_init__(self) -> None:
        reasons: list[str] = []
        if self.draining:
            reasons.append("draining")
        # A standalone node has no backend to lose and no bus inbox to listen on.
        if not self.standalone:
            if not self.backend_up:
                reasons.append("cluster backend unavailable")
            if not self.subscribed:
                reasons.append("bus subscription down")
        if not self.started:
            reasons.append("starting")
        object.__setattr__(self, "unready_reasons", tuple(reasons))
        object.__setattr__(self, "ready", not reasons)


class StatusBoard:
    """Holds the node's current :class:`NodeStatus`; readers never see a half-made change."""

    __slots__ = ("current",)

    def __init__(self, initial: NodeStatus) -> None:
        self.current = initial

    def __call__(self) -> NodeStatus:
        return self.current

    def update(
        self,
        *,
        started: bool | None = None,
        draining: bool | None = None,
        subscribed: bool | None = None,
        backend_up: bool | None = None,
    ) -> None:
        """Replace the status with these fields changed (None: unchanged)."""
        now = self.current
        self.current = dataclasses.replace(
            now,
            started=now.started if started is None else started,
            draining=now.draining if draining is None else draining,
            subscribed=now.subscribed if subscribed is None else subscribed,
            backend_up=now.backend_up if backend_up is None else backend_up,
        )

    def on_subscribed(self, up: bool) -> None:
        """The bus subscription to this node's inbox came up or went down."""
        if up != self.current.subscribed:
            self.update(subscribed=up)

    def on_backend(self, up: bool) -> None:
        """The cluster backend answered again, or stopped answering (reported after every
        liveness round: the status is replaced only when it changes)."""
        if up != self.current.backend_up:
            self.update(backend_up=up)
