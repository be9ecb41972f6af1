"""Where each WebSocket frame of a client starts and ends, and which ones the fast path takes.

``ClientConnection`` parses the frames that make up nearly all of its traffic itself, because
websockets' general parser (a generator-based stream reader, a ``Frame`` object and an events
list per frame) costs about four times as much per frame (2.2 against 0.5 µs for a 200-byte
text frame, measured on one of our 2-core machines). Two kinds of frame are taken: a whole,
unfragmented, masked text frame within the size limit, outside any fragmented message, and a
well-formed pong (the answer to the node's keepalive ping, so that thousands of idle clients
cost little). Every other frame is handed over whole and still masked, so websockets keeps
every rule about control frames, fragmentation, masking, reserved bits and closing.

The scanner is pure: bytes in, verdicts out, no I/O and no websockets state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

#: A whole text frame the fast path takes: the verdict comes with its unmasked payload.
FAST_TEXT: Final = 0
#: Any other whole frame: the verdict comes with its bytes as received, header included.
FOR_WEBSOCKETS: Final = 1
#: A frame that announces more than the size limit: the verdict comes with every byte left.
#: Websockets fails the connection on that header alone, so nothing is buffered for it.
HAND_OVER: Final = 2
#: The next frame is not complete yet; its bytes are kept until more arrive.
NEED_MORE: Final = 3
#: A whole, masked pong (the answer to a keepalive ping); its payload does not matter.
FAST_PONG: Final = 4
#: As FAST_TEXT, for a frame that ends the bytes received: the scanner then holds nothing,
#: and the next verdict is NEED_MORE (a caller that knows it need not ask).
LAST_TEXT: Final = 5

_NOTHING_YET: Final = (NEED_MORE, b"")

#: The longest frame header: two bytes, a 64-bit length and the 4-byte masking key. At most
#: ``max_size + MAX_HEADER_SIZE`` bytes are ever kept.
MAX_HEADER_SIZE: Final = 14

#: FIN set, RSV1-3 clear, opcode TEXT: the first byte of every frame the fast path takes.
_FIN_TEXT: Final = 0x81
#: FIN set, RSV1-3 clear, opcode PONG.
_FIN_PONG: Final = 0x8A
#: The longest payload of a control frame.
_MAX_CONTROL_PAYLOAD: Final = 125
_FIN: Final = 0x80
_MASKED: Final = 0x80
_LENGTH: Final = 0x7F
_OPCODE: Final = 0x0F
_CONT: Final = 0x0
_TEXT: Final = 0x1
_BINARY: Final = 0x2


def xor_mask(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """``payload`` XORed with the 4-byte ``mask`` repeated (RFC 6455, section 5.3)."""
    size = len(payload)
    repeats = (size + 3) >> 2
    # One XOR of two big integers; the key, 0 to 3 bytes too long, loses its tail bytes.
    key = int.from_bytes(bytes(mask) * repeats) >> (((repeats << 2) - size) << 3)
    return (int.from_bytes(payload) ^ key).to_bytes(size)


# websockets' C helper does the same 5 to 10 times faster (0.2 against 1.5 us for a 200-byte
# payload; about 7 % of a message's CPU on the node). It is not public API: it is used only
# when it exists and gives our answer (tests/node/test_dependencies.py checks that it does),
# and our own takes over if a release drops or changes it.
def _fastest_unmask() -> Callable[[bytes | bytearray, bytes | bytearray], bytes]:
    try:
        from websockets.speedups import apply_mask
    except ImportError:  # pragma: no cover - websockets' wheels ship the C extension
        return xor_mask
    sample, mask = b"\x01\x02\x03\x04\x05", b"\x10\x20\x30\x40"
    if apply_mask(sample, mask) != xor_mask(sample, mask):  # pragma: no cover
        return xor_mask
    return apply_mask


unmask: Final = _fastest_unmask()


class FrameScanner:
    """Splits the bytes a client sends into frames, one verdict per frame, in order.

    ``receive`` adds bytes; ``next_frame`` is then called until it says ``NEED_MORE`` (or
    ``LAST_TEXT``, after which it would).
    """

    __slots__ = ("_data", "_pos", "in_fragmented_message", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        #: True from the first frame of a fragmented message until its last one has gone to
        #: websockets, which assembles it; every frame in between goes there too.
        self.in_fragmented_message = False
        # Bytes received and not yet scanned start at _pos. Once next_frame has said NEED_MORE
        # this is empty or a bytearray of our own holding one incomplete frame.
        self._data: bytes | bytearray = b""
        self._pos = 0

    @property
    def buffered(self) -> int:
        """How many bytes received are not part of a frame returned yet."""
        return len(self._data) - self._pos

    def receive(self, data: bytes | bytearray) -> None:
        """Add bytes that follow those received before."""
        if self._pos == len(self._data):
            # The usual case: nothing kept, scan the caller's bytes without copying them (a
            # caller's bytearray is copied: _keep_rest edits bytearrays in place).
            self._data = data if type(data) is bytes else bytes(data)
            self._pos = 0
            return
        self._keep_rest()
        assert isinstance(self._data, bytearray)
        self._data += data

    def take_rest(self) -> bytes | bytearray:
        """Every byte not returned yet; the scanner is then empty."""
        rest = self._data[self._pos :]
        self._data = b""
        self._pos = 0
        return rest

    def next_frame(self) -> tuple[int, bytes | bytearray]:
        """The verdict on the next frame, with its payload or bytes (empty for NEED_MORE)."""
        data = self._data
        start = self._pos
        size = len(data)
        if start == size:
            # The usual end: the bytes received ended with a whole frame. Let go of them.
            self._data = b""
            self._pos = 0
            return _NOTHING_YET
        if size - start < 2:
            return self._need_more()
        first = data[start]
        second = data[start + 1]
        length = second & _LENGTH
        if length < 126:
            payload_start = start + 2
        elif length == 126:
            payload_start = start + 4
            if payload_start > size:
                return self._need_more()
            length = int.from_bytes(data[start + 2 : payload_start], "big")
        else:
            payload_start = start + 10
            if payload_start > size:
                return self._need_more()
            length = int.from_bytes(data[start + 2 : payload_start], "big")
        if length > self.max_size:
            self._data = b""
            self._pos = 0
            return HAND_OVER, data[start:]
        masked = second & _MASKED
        if masked:
            payload_start += 4
        end = payload_start + length
        if end > size:
            return self._need_more()
        if first == _FIN_TEXT and masked and not self.in_fragmented_message:
            mask = data[payload_start - 4 : payload_start]
            if end == size:
                # The usual read: it ends with this frame. Let go of the bytes.
                self._data = b""
                self._pos = 0
                return LAST_TEXT, unmask(data[payload_start:end], mask)
            self._pos = end
            return FAST_TEXT, unmask(data[payload_start:end], mask)
        self._pos = end
        if first == _FIN_PONG and masked and length <= _MAX_CONTROL_PAYLOAD:
            # Control frames may come between the fragments of a message, pongs included.
            return FAST_PONG, b""
        opcode = first & _OPCODE
        if opcode == _CONT:
            if first & _FIN:
                self.in_fragmented_message = False
        elif not first & _FIN and opcode in (_TEXT, _BINARY):
            self.in_fragmented_message = True
        return FOR_WEBSOCKETS, data[start:end]

    def _need_more(self) -> tuple[int, bytes]:
        self._keep_rest()
        return _NOTHING_YET

    def _keep_rest(self) -> None:
        # Kept bytes go into a bytearray of our own so that the rest of a long frame is
        # appended in place instead of copying what was kept again on every receive.
        data = self._data
        if isinstance(data, bytearray):
            del data[: self._pos]
        else:
            self._data = bytearray(memoryview(data)[self._pos :])
        self._pos = 0
