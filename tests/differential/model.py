"""A reference model of one broker node, in the test's own symbolic names.

The model is what "the cluster behaves exactly like one node" is checked against. It knows the
README's operations and the rules of ``docs/protocol.md`` and nothing of the implementation:
connection and channel ids are symbolic names chosen by the test (``conn-3``, ``chan-7``), and
frames are :data:`Expected` values with the broker's ``id`` left out (it is checked separately)
and ``replyTo`` replaced by the request's symbolic tag.

One node handles a client's requests in the order they arrive, each atomically. So the legal
outcomes of a step in which several clients act at once are exactly the serial interleavings
of their requests (each client's own order kept): :func:`interleavings` enumerates them, and
:meth:`Model.run` plays one. A disconnect notifies the peers of all the client's channels at
once, in no order the protocol fixes: those notifications form one unordered group.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

NOT_REGISTERED: Final = "Connection not registered"
ALREADY_REGISTERED: Final = "Connection already registered"
TARGET_NOT_FOUND: Final = "Target connection not found"
CHANNEL_NOT_FOUND: Final = "Channel not found"
NOT_AUTHORIZED: Final = "Not authorized for this channel"

#: A frame as a client must see it: a sorted tuple of (field, value) pairs.
Expected = tuple[tuple[str, Any], ...]


def frame(**fields: Any) -> Expected:
    return tuple(sorted(fields.items()))


@dataclass(frozen=True)
class Unordered:
    """Frames one event sends one client in no fixed order (a disconnect's notifications)."""

    frames: tuple[Expected, ...]


#: What one client must observe during a step, in order.
Observation = list[Expected | Unordered]


@dataclass(frozen=True)
class Register:
    tag: str
    role: str


@dataclass(frozen=True)
class ListByRole:
    tag: str
    role: str


@dataclass(frozen=True)
class Open:
    tag: str
    target: str


@dataclass(frozen=True)
class Message:
    tag: str
    channel: str
    payload: Any


@dataclass(frozen=True)
class Close:
    tag: str
    channel: str


@dataclass(frozen=True)
class Disconnect:
    """The client's socket closes; it comes back as a new, unregistered connection."""


Request = Register | ListByRole | Open | Message | Close
Action = Request | Disconnect


@dataclass
class Channel:
    opener: str
    target: str

    def ends(self) -> tuple[str, str]:
        return self.opener, self.target


@dataclass
class Model:
    """One node's state: which client holds which connection, the roles, the channels."""

    #: client index -> its current connection's name, or None while it is not registered.
    connection_of: dict[int, str | None]
    roles: dict[str, str] = field(default_factory=dict)
    channels: dict[str, Channel] = field(default_factory=dict)
    #: Every connection and channel name ever used, live or not (targets for requests).
    known_connections: list[str] = field(default_factory=list)
    known_channels: list[str] = field(default_factory=list)

    @classmethod
    def fresh(cls, clients: int) -> Model:
        return cls(connection_of=dict.fromkeys(range(clients)))

    def client_of(self, connection: str) -> int | None:
        for client, name in self.connection_of.items():
            if name == connection:
                return client
        return None

    def channels_of(self, connection: str) -> list[str]:
        return [name for name, ch in self.channels.items() if connection in ch.ends()]

    def live_channels(self) -> list[str]:
        return list(self.channels)

    def run(self, schedule: Sequence[tuple[int, Action]], clients: int) -> dict[int, Observation]:
        """Apply ``schedule`` in order; what each client observes."""
        seen: dict[int, Observation] = {c: [] for c in range(clients)}
        for client, action in schedule:
            self.apply(client, action, seen)
        return seen

    def apply(self, client: int, action: Action, seen: dict[int, Observation]) -> None:
        me = self.connection_of[client]
        out = seen[client]
        match action:
            case Register(tag=tag, role=role):
                if me is not None:
                    out.append(frame(type="register_failed", replyTo=tag, error=ALREADY_REGISTERED))
                    return
                name = f"conn-{tag}"
                self.connection_of[client] = name
                self.roles[name] = role
                self.known_connections.append(name)
                out.append(frame(type="registered", replyTo=tag, connectionId=name))
            case ListByRole(tag=tag, role=role):
                if me is None:
                    out.append(frame(type="list_by_role_failed", replyTo=tag, error=NOT_REGISTERED))
                    return
                ids = tuple(sorted(n for n, r in self.roles.items() if r == role))
                out.append(frame(type="connections", replyTo=tag, ids=ids))
            case Open(tag=tag, target=target):
                if me is None or target not in self.roles:
                    reason = NOT_REGISTERED if me is None else TARGET_NOT_FOUND
                    out.append(
                        frame(
                            type="channel_open_failed", replyTo=tag, targetId=target, error=reason
                        )
                    )
                    return
                name = f"chan-{tag}"
                self.channels[name] = Channel(me, target)
                self.known_channels.append(name)
                target_client = self.client_of(target)
                assert target_client is not None
                # The target hears of the channel before the opener can use it.
                seen[target_client].append(
                    frame(type="incoming_channel", **{"from": me}, channelId=name)
                )
                out.append(
                    frame(type="channel_opened", replyTo=tag, channelId=name, targetId=target)
                )
            case Message(tag=tag, channel=channel, payload=payload):
                error = self._refusal(me, channel)
                if error is not None:
                    out.append(
                        frame(
                            type="channel_message_failed",
                            replyTo=tag,
                            channelId=channel,
                            error=error,
                        )
                    )
                    return
                assert me is not None
                ch = self.channels[channel]
                peer = ch.target if me == ch.opener else ch.opener
                peer_client = self.client_of(peer)
                assert peer_client is not None
                seen[peer_client].append(
                    frame(type="channel_message", channelId=channel, payload=payload)
                )
                out.append(frame(type="channel_message_sent", replyTo=tag, channelId=channel))
            case Close(tag=tag, channel=channel):
                error = self._refusal(me, channel)
                if error is not None:
                    out.append(
                        frame(
                            type="channel_close_failed", replyTo=tag, channelId=channel, error=error
                        )
                    )
                    return
                assert me is not None
                ch = self.channels.pop(channel)
                peer = ch.target if me == ch.opener else ch.opener
                if peer != me:
                    peer_client = self.client_of(peer)
                    assert peer_client is not None
                    seen[peer_client].append(
                        frame(type="channel_closed_notification", channelId=channel)
                    )
                out.append(frame(type="channel_closed", replyTo=tag, channelId=channel))
            case Disconnect():
                self.connection_of[client] = None
                if me is None:
                    return
                del self.roles[me]
                told: dict[int, list[Expected]] = {}
                for name in self.channels_of(me):
                    ch = self.channels.pop(name)
                    peer = ch.target if me == ch.opener else ch.opener
                    if peer != me:
                        peer_client = self.client_of(peer)
                        assert peer_client is not None
                        told.setdefault(peer_client, []).append(
                            frame(type="channel_closed_notification", channelId=name)
                        )
                for peer_client, frames in told.items():
                    seen[peer_client].append(Unordered(tuple(frames)))
                # What the disconnecting client itself receives is not observed.
                seen[client] = []

    def _refusal(self, me: str | None, channel: str) -> str | None:
        if me is None:
            return NOT_REGISTERED
        ch = self.channels.get(channel)
        if ch is None:
            return CHANNEL_NOT_FOUND
        if me not in ch.ends():
            return NOT_AUTHORIZED
        return None


def interleavings(
    programs: dict[int, Sequence[Action]],
) -> Iterator[list[tuple[int, Action]]]:
    """Every merge of the clients' programs that keeps each client's own order."""
    waiting = {client: list(program) for client, program in programs.items() if program}
    if not waiting:
        yield []
        return
    for client in sorted(waiting):
        first, *rest = waiting[client]
        for tail in interleavings({**waiting, client: rest}):
            yield [(client, first), *tail]


@dataclass
class Outcome:
    """One legal result of a step: what each client observes, and the state after it."""

    seen: dict[int, Observation]
    after: Model


def outcomes(model: Model, programs: dict[int, Sequence[Action]], clients: int) -> list[Outcome]:
    """The results one node could produce for clients acting at once (one per interleaving)."""
    found: list[Outcome] = []
    for schedule in interleavings(programs):
        after = copy.deepcopy(model)
        seen = after.run(schedule, clients)
        if all(o.seen != seen for o in found):
            found.append(Outcome(seen, after))
    return found


def _subject(item: Expected) -> str:
    return next((str(value) for key, value in item if key == "channelId"), "")


def _by_subject(items: Sequence[Expected | Unordered]) -> dict[str, list[Expected | Unordered]]:
    """The frames about each channel (and those about none, under ""), in their order."""
    found: dict[str, list[Expected | Unordered]] = {}
    for item in items:
        if isinstance(item, Unordered):
            groups: dict[str, list[Expected]] = {}
            for one in item.frames:
                groups.setdefault(_subject(one), []).append(one)
            for subject, frames in groups.items():
                found.setdefault(subject, []).append(Unordered(tuple(frames)))
        else:
            found.setdefault(_subject(item), []).append(item)
    return found


def matches(observed: Sequence[Expected], expected: Observation) -> bool:
    """Whether ``observed`` is ``expected``: the same frames, in the same order per channel
    (frames about no channel count as one more channel), each unordered group in any order.

    Only the order per channel is demanded: one node confirms a message once the kernel has
    taken the recipient's bytes, so a later request's reply (about another channel) may come
    first, and a node answers so today.
    """
    seen, wanted = _by_subject(observed), _by_subject(expected)
    return seen.keys() == wanted.keys() and all(
        _matches_in_order(seen[s], wanted[s]) for s in wanted
    )


def may_become(observed: Sequence[Expected], expected: Observation) -> bool:
    """Whether more frames arriving could still make ``observed`` match ``expected``."""
    seen, wanted = _by_subject(observed), _by_subject(expected)
    return seen.keys() <= wanted.keys() and all(
        _may_become_in_order(frames, wanted[s]) for s, frames in seen.items()
    )


def _matches_in_order(observed: Sequence[Expected | Unordered], expected: Observation) -> bool:
    position = 0
    for item in expected:
        if isinstance(item, Unordered):
            width = len(item.frames)
            window = observed[position : position + width]
            if sorted(map(repr, window)) != sorted(map(repr, item.frames)):
                return False
            position += width
        else:
            if position >= len(observed) or observed[position] != item:
                return False
            position += 1
    return position == len(observed)


def _may_become_in_order(observed: Sequence[Expected | Unordered], expected: Observation) -> bool:
    position = 0
    for item in expected:
        if position >= len(observed):
            return True
        if isinstance(item, Unordered):
            window = list(observed[position : position + len(item.frames)])
            pool = list(item.frames)
            for one in window:
                if one not in pool:
                    return False
                pool.remove(one)
            position += len(window)
        else:
            if observed[position] != item:
                return False
            position += 1
    return position >= len(observed)


def width(expected: Observation) -> int:
    return sum(len(item.frames) if isinstance(item, Unordered) else 1 for item in expected)
