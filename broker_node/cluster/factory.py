"""Choose the cluster backend from the Redis URL, as encode/broadcaster chooses by scheme."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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


def masked_url(url: str) -> str:
    """``url`` fit for a log line: its password (in the userinfo or a ``password=`` query
    parameter, both of which redis-py reads) replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key == "password" for key, _ in pairs):
            query = urlencode(
                [(key, "***" if key == "password" else value) for key, value in pairs], safe="*"
            )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
