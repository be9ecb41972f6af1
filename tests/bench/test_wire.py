from __future__ import annotations

import msgspec
import pytest

from client.bench.wire import (
    BenchPayload,
    FrameKind,
    MessageFrameBuilder,
    classify,
    decode_frame,
    encode_ack,
    encode_request,
)


def test_message_frame_is_the_protocols_message_with_a_sized_payload() -> None:
    builder = MessageFrameBuilder("chan-1", payload_size=100)
    frame = builder.build(7, 12_345, 98_765_432_100_000_000 // 10)
    decoded = msgspec.json.decode(frame)
    assert decoded["type"] == "message"
    assert decoded["id"] == 7
    assert decoded["channelId"] == "chan-1"
    assert decoded["payload"]["s"] == 12_345
    payload = msgspec.json.encode(decoded["payload"])
    assert abs(len(payload) - 100) <= 2


def test_reference_width_payload_is_exact_and_odd_channel_ids_are_escaped() -> None:
    builder = MessageFrameBuilder('a"%d\\', payload_size=64)
    frame = builder.build(1, MessageFrameBuilder.REFERENCE_SEQ, MessageFrameBuilder.REFERENCE_NS)
    decoded = msgspec.json.decode(frame)
    assert decoded["channelId"] == 'a"%d\\'
    assert len(msgspec.json.encode(decoded["payload"])) == 64


def test_tiny_payload_size_means_no_padding() -> None:
    decoded = msgspec.json.decode(MessageFrameBuilder("c", payload_size=1).build(1, 1, 1))
    assert decoded["payload"] == {"s": 1, "t": 1, "p": ""}


def test_a_resumable_senders_message_carries_seq_and_keeps_its_payload_size() -> None:
    plain = MessageFrameBuilder("chan-1", payload_size=100)
    with_seq = MessageFrameBuilder("chan-1", payload_size=100, with_seq=True)
    decoded = msgspec.json.decode(with_seq.build(7, 12_345, 10**16))
    assert decoded["seq"] == decoded["payload"]["s"] == 12_345
    assert decoded["payload"] == msgspec.json.decode(plain.build(7, 12_345, 10**16))["payload"]
    assert "seq" not in msgspec.json.decode(plain.build(7, 12_345, 10**16))


def test_acks_name_channels_only_when_some_moved() -> None:
    assert msgspec.json.decode(encode_ack(5, 40, {})) == {"type": "ack", "id": 5, "lastId": 40}
    assert msgspec.json.decode(encode_ack(5, 40, {"c": 3}))["channels"] == {"c": 3}


def test_resume_fields_are_read() -> None:
    registered = decode_frame(
        b'{"type":"registered","id":1,"replyTo":1,"connectionId":"u","resumeToken":"t",'
        b'"resumeWindow":120}'
    )
    assert registered.resumeToken == "t"
    sent = decode_frame(
        b'{"type":"channel_message_sent","id":2,"replyTo":2,"channelId":"c","held":true}'
    )
    assert sent.held is True
    assert classify(sent) is FrameKind.REPLY_OK
    acked = decode_frame(b'{"type":"channel_acked","id":3,"channelId":"c","seq":9}')
    assert (classify(acked), acked.seq) == (FrameKind.CHANNEL_ACKED, 9)
    resumed = decode_frame(
        b'{"type":"resumed","id":9,"replyTo":4,"connectionId":"u","resumeToken":"t2",'
        b'"resumeWindow":120,"complete":true,"lastRequestId":3}'
    )
    assert (resumed.complete, resumed.resumeToken) == (True, "t2")


def test_requests() -> None:
    assert msgspec.json.decode(encode_request("open", 3, targetId="x")) == {
        "type": "open",
        "id": 3,
        "targetId": "x",
    }
    assert msgspec.json.decode(encode_request("register", 1, role="r", resume=True)) == {
        "type": "register",
        "id": 1,
        "role": "r",
        "resume": True,
    }


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        # our node: typed replies
        (b'{"type":"channel_message_sent","id":2,"replyTo":1,"channelId":"c"}', FrameKind.REPLY_OK),
        (
            b'{"type":"channel_message_failed","id":2,"replyTo":1,"channelId":"c","error":"e"}',
            FrameKind.REPLY_FAILED,
        ),
        (b'{"type":"error","id":2,"replyTo":1,"error":"e"}', FrameKind.REPLY_FAILED),
        # the original package: untyped success, "error" failure
        (b'{"replyTo":1,"id":2}', FrameKind.REPLY_OK),
        (b'{"connectionId":"u","replyTo":1,"id":2}', FrameKind.REPLY_OK),
        (b'{"type":"error","error":"e","replyTo":1,"id":2}', FrameKind.REPLY_FAILED),
        (b'{"type":"error","error":"bad","id":2}', FrameKind.ERROR),
        # notifications
        (
            b'{"type":"channel_message","id":3,"channelId":"c","payload":{"s":1,"t":2,"p":"x"}}',
            FrameKind.CHANNEL_MESSAGE,
        ),
        (
            b'{"type":"incoming_channel","id":3,"from":"u","channelId":"c"}',
            FrameKind.INCOMING_CHANNEL,
        ),
        (
            b'{"type":"channel_closed_notification","id":3,"channelId":"c"}',
            FrameKind.CHANNEL_CLOSED,
        ),
        (b'{"type":"something_new","id":3}', FrameKind.OTHER),
        (b'{"id":3}', FrameKind.OTHER),
    ],
)
def test_classify(frame: bytes, kind: FrameKind) -> None:
    assert classify(decode_frame(frame)) is kind


def test_decoded_fields() -> None:
    frame = decode_frame(
        b'{"type":"channel_message","id":3,"channelId":"c","payload":{"s":9,"t":2,"p":"x"}}'
    )
    assert frame.payload == BenchPayload(s=9, t=2)
    incoming = decode_frame(b'{"type":"incoming_channel","id":3,"from":"u","channelId":"c"}')
    assert incoming.from_ == "u"
    listing = decode_frame(b'{"type":"connections","id":3,"replyTo":1,"ids":["a","b"]}')
    assert listing.ids == ["a", "b"]


def test_foreign_payloads_and_garbage_do_not_decode() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_frame(b'{"type":"channel_message","id":3,"channelId":"c","payload":"hello"}')
    with pytest.raises(msgspec.DecodeError):
        decode_frame(b"not json")
