"""Where a token travels in the WebSocket handshake, and keeping it out of the logs.

* ``Sec-WebSocket-Protocol: broker.v1, broker.bearer.<token>`` (browsers cannot set other
  headers): the node answers with the application subprotocol ``broker.v1`` only, as browsers
  require one offered subprotocol to be echoed.
* ``?token=<token>`` on the URL, only when the node allows it (the original JS client can set
  nothing else); every log record of the handshake has it redacted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Final
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.exceptions import InvalidHeader
from websockets.headers import parse_subprotocol
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

#: The application subprotocol a browser offers along with its bearer token.
APP_SUBPROTOCOL: Final = Subprotocol("broker.v1")
BEARER_PREFIX: Final = "broker.bearer."

_SECRET_IN_TEXT: Final = re.compile(r"(token=|broker\.bearer\.)[^&\s,;]*")


def select_subprotocol(
    protocol: ServerProtocol, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """Echo ``broker.v1`` when offered; a client that offers nothing gets nothing."""
    return APP_SUBPROTOCOL if APP_SUBPROTOCOL in offered else None


def handshake_token(path: str, headers: Headers, *, query_allowed: bool) -> str | None:
    """The token of a handshake request: the bearer subprotocol first, then the URL's."""
    for value in headers.get_all("Sec-WebSocket-Protocol"):
        try:
            offered = parse_subprotocol(value)
        except InvalidHeader:
            continue
        for item in offered:
            if item.startswith(BEARER_PREFIX):
                return item[len(BEARER_PREFIX) :]
    if query_allowed:
        tokens = parse_qs(urlsplit(path).query).get("token")
        if tokens:
            return tokens[0]
    return None


def redact(text: str) -> str:
    return _SECRET_IN_TEXT.sub(r"\1[redacted]", text)


class RedactTokens(logging.Filter):
    """Rewrites log records so that no URL token or bearer subprotocol is ever written."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and _SECRET_IN_TEXT.search(record.msg):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple) and any(
            isinstance(arg, str) and _SECRET_IN_TEXT.search(arg) for arg in record.args
        ):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True
