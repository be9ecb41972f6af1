"""Choose the cluster backend from the Redis URL, as encode/broadcaster chooses by scheme."""

from __future__ import annotations

from urllib.parse import urlsplit

from broker_node.cluster.base import Backend
from broker_node.config import Settings
from broker_node.errors import ConfigurationError

#: URL schemes served by the Redis backend (TCP, TLS, and a Unix socket).
REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})


def create_backend(settings: Settings) -> Backend:
    """The backend for ``settings.redis_url``: none is a standalone node in memory."""
    url = settings.redis_url
    if url is None:
        from broker_node.cluster.memory import MemoryBackend

        return MemoryBackend(standalone=True)
    scheme = urlsplit(url).scheme.lower()
    if scheme in REDIS_SCHEMES:
        # Imported here, as broadcaster does, so that a standalone node never loads redis.
        from broker_node.cluster.redis import RedisBackend

        return RedisBackend(settings)
    # Name the scheme only: the URL may hold a password.
    raise ConfigurationError(
        f"unsupported cluster backend URL scheme {scheme!r}: "
        f"use one of {', '.join(sorted(s + '://' for s in REDIS_SCHEMES))} or none"
    )
