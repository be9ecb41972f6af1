"""The fast path's frame splitter, without sockets: bytes in, verdicts out, in order."""

from __future__ import annotations

import pytest

from broker_node.frame_scanner import (
    FAST_PONG,
    FAST_TEXT,
    FOR_WEBSOCKETS,
    HAND_OVER,
    LAST_TEXT,
    MAX_HEADER_SIZE,
    NEED_MORE,
    FrameScanner,
)
from tests.support.raw_ws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    client_frame,
)

MAX_SIZE = 70_000

Verdict = tuple[int, bytes]


def drain(scanner: FrameScanner) -> list[Verdict]:
    """Every verdict up to NEED_MORE (or HAND_OVER, after which the scanner is done); a
    LAST_TEXT counts as the FAST_TEXT it is, once checked that nothing is left after it."""
    verdicts: list[Verdict] = []
    while True:
        verdict, data = scanner.next_frame()
        if verdict == NEED_MORE:
            assert data == b""
            return verdicts
        if verdict == LAST_TEXT:
            assert scanner.buffered == 0
            assert scanner.next_frame() == (NEED_MORE, b"")
            verdict = FAST_TEXT
        verdicts.append((verdict, bytes(data)))
        if verdict == HAND_OVER:
            return verdicts


def scan(*chunks: bytes, max_size: int = MAX_SIZE) -> list[Verdict]:
    scanner = FrameScanner(max_size)
    verdicts: list[Verdict] = []
    for chunk in chunks:
        scanner.receive(chunk)
        verdicts += drain(scanner)
    return verdicts


# A stream with every kind of frame, each followed by what the scanner must say about it.
SMALL = b'{"type":"list_by_role","id":1,"role":"r"}'
MEDIUM = b'{"payload":"' + b"m" * 300 + b'"}'
LARGE = b'{"payload":"' + b"L" * 66_000 + b'"}'
PING = client_frame(b"are you there", opcode=OP_PING)
PONG = client_frame(b"", opcode=OP_PONG)
# Not pongs a well-behaved client sends: websockets answers them (with 1002).
LONG_PONG = client_frame(b"p" * 126, opcode=OP_PONG, length_bytes=2)
UNFINISHED_PONG = client_frame(b"", opcode=OP_PONG, fin=False)
BINARY = client_frame(b"\x00\x01", opcode=OP_BINARY)
FIRST_PART = client_frame(b'{"type":', fin=False)
MIDDLE_PART = client_frame(b'"list_by_role",', opcode=OP_CONT, fin=False)
LAST_PART = client_frame(b'"id":2,"role":"r"}', opcode=OP_CONT)
STREAM: list[tuple[bytes, Verdict]] = [
    (client_frame(SMALL), (FAST_TEXT, SMALL)),
    (client_frame(MEDIUM), (FAST_TEXT, MEDIUM)),
    (PING, (FOR_WEBSOCKETS, PING)),
    (client_frame(SMALL, length_bytes=8), (FAST_TEXT, SMALL)),
    (client_frame(SMALL, length_bytes=2), (FAST_TEXT, SMALL)),
    (client_frame(b""), (FAST_TEXT, b"")),
    (FIRST_PART, (FOR_WEBSOCKETS, FIRST_PART)),
    (PING, (FOR_WEBSOCKETS, PING)),
    (MIDDLE_PART, (FOR_WEBSOCKETS, MIDDLE_PART)),
    (LAST_PART, (FOR_WEBSOCKETS, LAST_PART)),
    (client_frame(LARGE), (FAST_TEXT, LARGE)),
    (PONG, (FAST_PONG, b"")),
    (LONG_PONG, (FOR_WEBSOCKETS, LONG_PONG)),
    (UNFINISHED_PONG, (FOR_WEBSOCKETS, UNFINISHED_PONG)),
    (BINARY, (FOR_WEBSOCKETS, BINARY)),
    (client_frame("é €".encode()), (FAST_TEXT, "é €".encode())),
]
STREAM_BYTES = b"".join(frame for frame, _ in STREAM)
EXPECTED = [verdict for _, verdict in STREAM]


def test_one_write_holding_every_kind_of_frame() -> None:
    assert scan(STREAM_BYTES) == EXPECTED


def test_the_stream_cut_in_two_at_every_byte() -> None:
    # Every cut of the small frames' bytes, headers and masks included; the large frame is
    # cut wherever its length encoding allows a cut and at a few payload offsets.
    large_start = STREAM_BYTES.index(client_frame(LARGE))
    cuts = [
        *range(1, large_start + 20),
        large_start + 30_000,
        *range(len(STREAM_BYTES) - 200, len(STREAM_BYTES)),
    ]
    for cut in cuts:
        assert scan(STREAM_BYTES[:cut], STREAM_BYTES[cut:]) == EXPECTED, cut


def test_byte_by_byte() -> None:
    without_large = [(f, v) for f, v in STREAM if v != (FAST_TEXT, LARGE)]
    data = b"".join(frame for frame, _ in without_large)
    assert scan(*(data[i : i + 1] for i in range(len(data)))) == [v for _, v in without_large]


@pytest.mark.parametrize("length_bytes", [0, 2, 8])
def test_every_cut_of_one_frame_in_each_length_encoding(length_bytes: int) -> None:
    payload = SMALL if length_bytes == 0 else MEDIUM
    frame = client_frame(payload, length_bytes=length_bytes)
    for cut in range(1, len(frame)):
        assert scan(frame[:cut], frame[cut:]) == [(FAST_TEXT, payload)], cut
        for second_cut in range(cut + 1, min(len(frame), cut + 16)):
            chunks = frame[:cut], frame[cut:second_cut], frame[second_cut:]
            assert scan(*chunks) == [(FAST_TEXT, payload)], (cut, second_cut)


@pytest.mark.parametrize(
    "frame",
    [
        client_frame(SMALL, mask=None),
        client_frame(SMALL, rsv=0b100),
        client_frame(SMALL, rsv=0b010),
        client_frame(SMALL, rsv=0b001),
        client_frame(SMALL, fin=False),
        client_frame(SMALL, opcode=OP_BINARY),
        client_frame(SMALL, opcode=OP_CONT),
        client_frame(b"\x03\xe8bye", opcode=OP_CLOSE),
        client_frame(SMALL, opcode=0x3),
        client_frame(b"x" * 200, opcode=OP_PING),
    ],
    ids=[
        "unmasked",
        "rsv1",
        "rsv2",
        "rsv3",
        "not-fin",
        "binary",
        "stray-continuation",
        "close",
        "reserved-opcode",
        "long-ping",
    ],
)
def test_frames_websockets_judges_go_to_it_whole_and_still_masked(frame: bytes) -> None:
    after = client_frame(SMALL)
    verdicts = scan(frame + after)
    assert verdicts[0] == (FOR_WEBSOCKETS, frame)
    # Only a text or binary frame without FIN starts a message websockets must assemble.
    fragmented = frame[0] & 0x80 == 0 and frame[0] & 0x0F in (OP_TEXT, OP_BINARY)
    assert verdicts[1:] == [(FOR_WEBSOCKETS, after) if fragmented else (FAST_TEXT, SMALL)]


def test_a_fragmented_message_goes_to_websockets_up_to_its_last_frame() -> None:
    text = client_frame(SMALL)
    binary_first = client_frame(b"\x00", opcode=OP_BINARY, fin=False)
    binary_last = client_frame(b"\x01", opcode=OP_CONT)
    # Even a text frame with FIN inside the message (a protocol error) is websockets' to judge.
    data = FIRST_PART + text + MIDDLE_PART + LAST_PART + text + binary_first + binary_last + text
    assert scan(data) == [
        (FOR_WEBSOCKETS, FIRST_PART),
        (FOR_WEBSOCKETS, text),
        (FOR_WEBSOCKETS, MIDDLE_PART),
        (FOR_WEBSOCKETS, LAST_PART),
        (FAST_TEXT, SMALL),
        (FOR_WEBSOCKETS, binary_first),
        (FOR_WEBSOCKETS, binary_last),
        (FAST_TEXT, SMALL),
    ]


@pytest.mark.parametrize("length_bytes", [2, 8])
def test_a_header_over_the_limit_hands_everything_over_at_once(length_bytes: int) -> None:
    before = client_frame(SMALL)
    over = client_frame(b"y" * 1001, length_bytes=length_bytes)
    header = over[: 2 + length_bytes]
    # Nothing of the payload has arrived: the header alone is enough to refuse it.
    assert scan(before + header, max_size=1000) == [(FAST_TEXT, SMALL), (HAND_OVER, header)]
    # Whatever follows the header in the same write goes along (websockets discards it).
    assert scan(over + before, max_size=1000) == [(HAND_OVER, over + before)]
    # The header itself cut in two.
    assert scan(header[:3], header[3:], max_size=1000) == [(HAND_OVER, header)]


def test_a_frame_of_exactly_the_limit_is_taken() -> None:
    payload = b"z" * 1000
    assert scan(client_frame(payload), max_size=1000) == [(FAST_TEXT, payload)]


def test_a_127_length_with_its_top_bit_set_is_over_any_limit() -> None:
    header = bytes([0x81, 0xFF]) + (1 << 63).to_bytes(8, "big")
    assert scan(header) == [(HAND_OVER, header)]


def test_never_keeps_more_than_one_frame_at_the_limit() -> None:
    scanner = FrameScanner(1000)
    frame = client_frame(b"w" * 1000, length_bytes=8)
    assert len(frame) == 1000 + MAX_HEADER_SIZE
    for byte in frame[:-1]:
        scanner.receive(bytes([byte]))
        assert drain(scanner) == []
        assert scanner.buffered <= 1000 + MAX_HEADER_SIZE
    scanner.receive(frame[-1:])
    assert drain(scanner) == [(FAST_TEXT, b"w" * 1000)]
    assert scanner.buffered == 0


def test_take_rest_returns_what_was_not_returned() -> None:
    scanner = FrameScanner(MAX_SIZE)
    frame = client_frame(SMALL)
    scanner.receive(frame + frame[:5])
    assert scanner.next_frame() == (FAST_TEXT, SMALL)
    assert scanner.buffered == 5
    assert scanner.take_rest() == frame[:5]
    assert scanner.buffered == 0
    scanner.receive(frame)
    assert drain(scanner) == [(FAST_TEXT, SMALL)]


def test_the_callers_bytearray_is_left_alone() -> None:
    frame = client_frame(SMALL)
    chunk = bytearray(frame + frame[:7])
    original = bytes(chunk)
    scanner = FrameScanner(MAX_SIZE)
    scanner.receive(chunk)
    assert drain(scanner) == [(FAST_TEXT, SMALL)]
    scanner.receive(frame[7:])
    assert drain(scanner) == [(FAST_TEXT, SMALL)]
    assert chunk == original


def test_a_text_frame_that_ends_the_bytes_says_so() -> None:
    """LAST_TEXT: the read ended with this frame, so the caller need not ask again."""
    scanner = FrameScanner(MAX_SIZE)
    scanner.receive(client_frame(SMALL) + client_frame(MEDIUM))
    assert scanner.next_frame() == (FAST_TEXT, SMALL)
    assert scanner.next_frame() == (LAST_TEXT, MEDIUM)
    scanner.receive(client_frame(SMALL)[:3])
    assert scanner.next_frame() == (NEED_MORE, b"")
    scanner.receive(client_frame(SMALL)[3:])
    assert scanner.next_frame() == (LAST_TEXT, SMALL)
    assert scanner.buffered == 0
