"""The pure parts of session resume: tokens, frame parsing, the retained-frame log, expiry."""

from __future__ import annotations

import msgspec
import pytest

from broker_node.core.sessions import (
    Session,
    SessionLog,
    frame_id_of,
    new_resume_token,
    token_hash,
)
from shared.codec import encode
from shared.ids import ConnectionId
from shared.messages import ChannelClosedNotification, ChannelMessage, ChannelMessageSent


def _message(
    frame_id: int, channel: str = "c1", seq: int | None = None, payload: bytes = b"1"
) -> bytes:
    return encode(
        ChannelMessage(id=frame_id, channelId=channel, seq=seq, payload=msgspec.Raw(payload))
    )


def test_tokens_are_random_and_only_their_hash_is_kept() -> None:
    token, hashed = new_resume_token()
    other, _ = new_resume_token()
    assert token != other
    assert len(token) >= 22
    assert hashed == token_hash(token) != token
    assert len(hashed) == 64


def test_the_frame_id_is_read_from_our_frames() -> None:
    assert frame_id_of(encode(ChannelMessageSent(id=42, replyTo=7, channelId="c"))) == 42
    assert frame_id_of(encode(ChannelClosedNotification(id=4, channelId="c"))) == 4
    assert frame_id_of(_message(5, payload=b'{"type":"x","id":99}')) == 5
    with pytest.raises(ValueError, match="not a broker frame"):
        frame_id_of(b'{"id":1}')


def test_renumbering_gives_frames_new_ids_in_order() -> None:
    log = SessionLog(max_frames=10, max_bytes=10_000)
    log.append(_message(1, payload=b'"a"'))
    log.append(encode(ChannelClosedNotification(id=2, channelId="c")))
    assert log.renumber(41) == 43
    assert [frame_id_of(frame) for frame in log.frames()] == [41, 42]
    assert log.size == sum(map(len, log.frames()))
    assert log.acked_id == 40
    assert log.after(41) == log.frames()[1:]


def test_the_log_keeps_frames_until_acked_and_replays_what_follows() -> None:
    log = SessionLog(max_frames=10, max_bytes=10_000)
    frames = [_message(1, seq=1), _message(2, "c2", seq=1), _message(3, seq=2), _message(4)]
    for frame in frames:
        assert log.append(frame)
    assert len(log) == 4
    assert log.size == sum(map(len, frames))
    assert log.last_id == 4
    assert log.after(2) == frames[2:]
    assert log.frames() == frames
    log.ack(3)
    assert log.after(0) == frames[3:]
    assert log.acked_id == 3
    log.ack(2)
    assert log.acked_id == 3
    log.ack(4)
    assert len(log) == 0
    assert log.size == 0
    assert log.last_id == 4


def test_the_log_reports_passing_a_bound() -> None:
    by_count = SessionLog(max_frames=2, max_bytes=10_000)
    assert by_count.append(_message(1))
    assert by_count.append(_message(2))
    assert not by_count.append(_message(3))
    by_bytes = SessionLog(max_frames=100, max_bytes=len(_message(1)) + 1)
    assert by_bytes.append(_message(1))
    assert not by_bytes.append(_message(2))


def test_a_session_expires_a_window_after_it_detached() -> None:
    session = Session(ConnectionId("a"), token_hash("t"), 120, SessionLog(10, 1000))
    assert session.attached
    assert session.expires_at() is None
    assert not session.expired(1e9)
    session.detached_at = 100.0
    assert not session.attached
    assert session.expires_at() == 220.0
    assert not session.expired(219.9)
    assert session.expired(220.0)
