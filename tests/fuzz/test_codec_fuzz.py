"""The codec against thousands of generated frames: an answer for each, never an exception."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.codec import (
    READABLE_DEPTH,
    CloseConnection,
    ErrorReply,
    FailedReply,
    decode_request,
    nesting_depth,
)
from shared.messages import Message, Request
from tests.fuzz.strategies import frames, json_texts, request_frames


def _reject(name: str) -> Any:
    raise ValueError(name)


def stdlib_valid(frame: str | bytes) -> bool:
    try:
        json.loads(frame, parse_constant=_reject, parse_int=str, parse_float=str)
    except (ValueError, RecursionError):
        return False
    return True


@settings(max_examples=1000, deadline=None)
@given(frames)
def test_every_frame_gets_a_request_or_a_rejection(frame: str | bytes) -> None:
    result = decode_request(frame)
    assert isinstance(result, (*Request.__args__, CloseConnection, ErrorReply, FailedReply))
    data = frame.encode() if isinstance(frame, str) else frame
    if isinstance(result, Message):
        assert bytes(result.payload) in data
    # Valid JSON is never "Invalid JSON", at whatever depth the node can still read it.
    readable = nesting_depth(data, READABLE_DEPTH) <= READABLE_DEPTH
    if isinstance(result, CloseConnection) and result.reason == "Invalid JSON" and readable:
        try:
            text = data.decode()
        except UnicodeDecodeError:
            return
        assert not stdlib_valid(text), frame


@settings(max_examples=600, deadline=None)
@given(json_texts)
def test_every_payload_is_carried_byte_for_byte_or_refused_with_a_reason(payload: str) -> None:
    frame = f'{{"type":"message","id":1,"channelId":"c","payload":{payload}}}'
    result = decode_request(frame)
    if isinstance(result, Message):
        # Byte for byte, without the whitespace around the value (not part of it).
        assert bytes(result.payload) == payload.strip(" \t\n\r").encode()
    else:
        assert isinstance(result, (FailedReply, CloseConnection)), result
        reason = result.error if isinstance(result, FailedReply) else result.reason
        assert "nested deeper" in reason or "surrogate" in reason, reason


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 300), st.integers(2, 256))
def test_depth_limit_is_exact(depth: int, limit: int) -> None:
    frame = '{"type":"message","id":1,"channelId":"c","payload":' + "[" * depth + "]" * depth + "}"
    result = decode_request(frame, limit)
    assert isinstance(result, Message) == (depth + 1 <= limit)


@settings(max_examples=300, deadline=None)
@given(request_frames(channel_id="c", target_id="t"))
def test_request_shaped_frames(frame: str) -> None:
    decode_request(frame)
