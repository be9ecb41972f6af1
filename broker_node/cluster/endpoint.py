"""Where the bus's own Redis connections go, and how they log in: read from the Redis URL.

The registry's connections are redis-py's; the bus opens its sockets itself (see ``resp.py``)
from the same URL, parsed by redis-py's public ``parse_url`` so that both read it alike:
``redis://`` (TCP), ``rediss://`` (TLS with the ``ssl`` module: ``ssl_cert_reqs``,
``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``) and ``unix://``
(a socket path), each with an optional ACL user, password and db.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from broker_node.errors import ConfigurationError

#: Redis' own default port.
DEFAULT_PORT = 6379

_CERT_REQS = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}


@dataclass(frozen=True, repr=False)
class RedisEndpoint:
    """A Redis server and the handshake a new connection to it makes."""

    host: str = "localhost"
    port: int = DEFAULT_PORT
    #: A Unix socket path instead of host and port.
    path: str | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        # Never the password: endpoints end up in logs and tracebacks.
        where = self.path if self.path is not None else f"{self.host}:{self.port}"
        return f"RedisEndpoint({where}, db={self.db}, tls={self.tls is not None})"

    @classmethod
    def from_url(cls, url: str) -> RedisEndpoint:
        try:
            options: dict[str, Any] = dict(parse_url(url))
        except ValueError as exc:
            raise ConfigurationError(f"invalid Redis URL: {exc}") from exc
        if str(options.get("protocol", 2)) != "2":
            raise ConfigurationError("the Redis URL must not ask for a protocol other than 2")
        connection_class = options.get("connection_class")
        username = options.get("username") or None
        password = options.get("password") or None
        db = int(options.get("db") or 0)
        if connection_class is UnixDomainSocketConnection:
            return cls(path=str(options["path"]), username=username, password=password, db=db)
        return cls(
            host=str(options.get("host") or "localhost"),
            port=int(options.get("port") or DEFAULT_PORT),
            username=username,
            password=password,
            db=db,
            tls=_tls_context(options) if connection_class is SSLConnection else None,
        )

    def handshake(self) -> list[tuple[bytes, ...]]:
        """The commands a new connection sends before any other (each answers ``+OK``)."""
        commands: list[tuple[bytes, ...]] = []
        if self.password is not None:
            if self.username is not None:
                commands.append((b"AUTH", self.username.encode(), self.password.encode()))
            else:
                commands.append((b"AUTH", self.password.encode()))
        if self.db:
            commands.append((b"SELECT", str(self.db).encode()))
        return commands


def _tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    reqs = options.get("ssl_cert_reqs", "required")
    if isinstance(reqs, str):
        if reqs.lower() not in _CERT_REQS:
            raise ConfigurationError(f"invalid ssl_cert_reqs {reqs!r} in the Redis URL")
        reqs = _CERT_REQS[reqs.lower()]
    check_hostname = options.get("ssl_check_hostname")
    if check_hostname is None:
        check_hostname = reqs != ssl.CERT_NONE
    # check_hostname must be off before verify_mode may be CERT_NONE.
    context.check_hostname = bool(check_hostname) and reqs != ssl.CERT_NONE
    context.verify_mode = reqs
    certfile = options.get("ssl_certfile")
    if certfile:
        context.load_cert_chain(certfile, options.get("ssl_keyfile"))
    return context
