"""Free TCP ports on the loopback interface for servers the tests start."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
