"""The node's authentication shell: the verifier, the background loops, per-user slots.

``BrokerNode`` holds one ``NodeAuth`` and calls it from a few hooks (start, a handshake or
request token, a register, a client gone, stop); the decisions stay in the core
(``BrokerCore.begin_register``/``refresh``/``check_tokens``/``revoke``) and in the pure
modules. Loops, all supervised by the node's ``Supervisor``:

* ``token-check``: twice a second, close connections without a token in time or whose token
  expired past the grace period (the core decides which);
* ``jwks-refresh``: read the JWKS again in a worker thread;
* ``revocations`` (with Redis): follow ``broker-admin``'s revocations;
* ``user-counts`` (with Redis and a per-user limit): keep this node's counts alive in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from broker_node.auth.identity import Identity, TokenRefusal
from broker_node.auth.jwks import refresh_forever
from broker_node.auth.revocation import Revocation, RevocationKeys, RevocationList, listen
from broker_node.auth.setup import AuthSetup, build_auth
from broker_node.auth.user_limits import RedisUserCounts, UserCountKeys
from broker_node.config import Settings
from broker_node.core.broker import REGISTRY_UNAVAILABLE, USER_LIMIT
from broker_node.supervisor import Supervisor
from shared.ids import ConnectionId, NodeId

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger("broker_node.auth")

#: How often tokens are checked for expiry and connections for authentication in time.
TOKEN_CHECK_INTERVAL: Final = 0.5
LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "::1", "localhost"})


class NodeAuth:
    """See the module docstring; ``setup`` is None when authentication is off."""

    def __init__(self, settings: Settings, node_id: NodeId) -> None:
        self.settings = settings
        self.node_id = node_id
        #: Users and tokens revoked cluster-wide (filled from Redis).
        self.revocations = RevocationList()
        self.setup: AuthSetup | None = build_auth(settings, self.is_revoked)
        self._revocations_loaded = asyncio.Event()
        # Per-user limits: this node's counts, the user of each counted connection, and the
        # Redis side (None: a standalone node counts alone).
        self._user_connections: Counter[str] = Counter()
        self._counted: dict[ConnectionId, str] = {}
        self._user_counts: RedisUserCounts | None = None
        self._user_counts_lost = False
        self._background: set[asyncio.Task[None]] = set()

    # --- lifecycle -----------------------------------------------------------------------

    async def start(
        self,
        supervisor: Supervisor,
        *,
        check_tokens: Callable[[], None],
        on_revoked: Callable[[], None],
    ) -> None:
        """Start the loops; with Redis, return once the remembered revocations are loaded."""
        settings = self.settings
        setup = self.setup
        if setup is None:
            if settings.host not in LOOPBACK_HOSTS:
                logger.warning(
                    "AUTHENTICATION IS OFF while listening on %s: anyone who reaches this "
                    "port can register under any role, list every connection and open "
                    "channels to them (see the README's Security section)",
                    settings.host,
                )
            return

        async def token_check_loop() -> None:
            while True:
                await asyncio.sleep(TOKEN_CHECK_INTERVAL)
                check_tokens()
                self.revocations.prune(time.time())

        supervisor.start("token-check", token_check_loop)
        jwks, source = setup.jwks, settings.auth_jwks
        if jwks is not None and source is not None:
            interval = settings.auth_jwks_refresh
            supervisor.start("jwks-refresh", lambda: refresh_forever(jwks, source, interval))
        if settings.redis_url is None:
            return
        if settings.auth_max_connections_per_user > 0:
            redis = _redis(settings.redis_url, settings.request_timeout)
            keys = UserCountKeys(settings.redis_prefix)
            self._user_counts = RedisUserCounts(redis, keys, self.node_id)
            supervisor.start("user-counts", self._user_counts_loop)
        supervisor.start("revocations", lambda: self._revocation_loop(on_revoked))
        # Tokens revoked before this node started must be refused from its first client.
        try:
            async with asyncio.timeout(settings.request_timeout * 2):
                await self._revocations_loaded.wait()
        except TimeoutError:
            logger.warning("revocations not loaded yet; they apply once Redis answers")

    async def aclose(self) -> None:
        """After the supervisor stopped: release what the loops held."""
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._user_counts is not None:
            await self._user_counts.aclose()

    # --- tokens --------------------------------------------------------------------------

    def verify(self, token: str | None) -> Identity | TokenRefusal | None:
        """The verified token, or None when there is none or authentication is off."""
        if token is None or self.setup is None:
            return None
        return self.setup.verifier.verify(token)

    def is_revoked(self, identity: Identity) -> bool:
        return self.revocations.is_revoked(identity, time.time())

    async def _revocation_loop(self, on_revoked: Callable[[], None]) -> None:
        from redis.exceptions import RedisError

        assert self.settings.redis_url is not None
        keys = RevocationKeys(self.settings.redis_prefix)
        lost = False

        def subscribed() -> None:
            nonlocal lost
            self._revocations_loaded.set()
            if lost:
                logger.info("revocation listener is back")
            lost = False

        def revoked(revocation: Revocation) -> None:
            self.revocations.add(revocation)
            on_revoked()

        while True:
            redis = _redis(self.settings.redis_url, self.settings.request_timeout, listening=True)
            try:
                await listen(redis, keys, revoked, subscribed)
            except (RedisError, OSError) as exc:
                # Logged once per outage; what was revoked meanwhile is loaded on return.
                if not lost:
                    logger.warning("revocation listener lost Redis (%s); retrying", exc)
                lost = True
            finally:
                await redis.aclose()
            await asyncio.sleep(min(1.0, self.settings.heartbeat_interval))

    # --- per-user limits -----------------------------------------------------------------

    async def take_slot(self, cid: ConnectionId, identity: Identity | None) -> str | None:
        """Count a registering connection against its user's limit; the error to answer, or
        None (counted, or no limit)."""
        from redis.exceptions import RedisError

        limit = self.settings.auth_max_connections_per_user
        if limit <= 0 or identity is None:
            return None
        user = identity.subject
        if self._user_counts is None:
            if self._user_connections[user] >= limit:
                return USER_LIMIT
        else:
            try:
                async with asyncio.timeout(self.settings.request_timeout):
                    taken = await self._user_counts.acquire(user, limit)
            except (TimeoutError, RedisError, OSError):
                # The slot may have been taken: the next keep round writes the truth again.
                self._user_counts_lost = True
                return REGISTRY_UNAVAILABLE
            if not taken:
                return USER_LIMIT
        self._counted[cid] = user
        self._user_connections[user] += 1
        return None

    def drop_slot(self, cid: ConnectionId) -> None:
        """The connection is gone (or its register failed): give its user's slot back."""
        user = self._counted.pop(cid, None)
        if user is None:
            return
        self._user_connections[user] -= 1
        if self._user_connections[user] <= 0:
            del self._user_connections[user]
        if self._user_counts is not None:
            task = asyncio.get_running_loop().create_task(self._release(user))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _release(self, user: str) -> None:
        from redis.exceptions import RedisError

        assert self._user_counts is not None
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                await self._user_counts.release(user)
        except (TimeoutError, RedisError, OSError):
            self._user_counts_lost = True

    async def _user_counts_loop(self) -> None:
        from redis.exceptions import RedisError

        assert self._user_counts is not None
        ttl_ms = self.settings.node_ttl_ms * 2
        while True:
            rewrite, self._user_counts_lost = self._user_counts_lost, False
            try:
                async with asyncio.timeout(self.settings.request_timeout):
                    await self._user_counts.keep(self._user_connections, ttl_ms, rewrite=rewrite)
            except (TimeoutError, RedisError, OSError) as exc:
                logger.debug("per-user counts not renewed: %s", exc)
                self._user_counts_lost = True
            await asyncio.sleep(self.settings.heartbeat_interval)


def _redis(url: str, timeout: float, *, listening: bool = False) -> Redis:
    """A client of its own, without redis-py's retries: a pub/sub connection that reconnects
    silently would lose the revocations published meanwhile, whereas an error makes the
    listener subscribe again and reload what Redis remembers."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        # The listener waits for messages indefinitely; a PING every half minute finds a
        # connection that died without a word.
        socket_timeout=None if listening else timeout,
        socket_keepalive=True,
        health_check_interval=30 if listening else 0,
        retry=Retry(NoBackoff(), 0),
    )
