"""Every registry request of the node goes through here: bounded by the request timeout,
timed into the node's stats, and the backend's up/down state followed from the outcome."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from broker_node.cluster.factory import masked_url
from broker_node.core.stats import NodeStats
from broker_node.errors import BackendUnavailable

logger = logging.getLogger("broker_node.registry_calls")

_T = TypeVar("_T")


class RegistryCaller(Protocol):
    """Registry calls, timed, bounded by the request timeout, failing as BackendUnavailable
    (what the dispatcher and the drain need of :class:`RegistryCalls`)."""

    async def call(self, operation: str, call: Awaitable[_T]) -> _T: ...


class RegistryCalls:
    """Runs registry calls and tells ``on_state`` when the backend goes down or comes back."""

    def __init__(
        self,
        *,
        stats: NodeStats,
        request_timeout: float,
        redis_url: str | None,
        on_state: Callable[[bool], None],
    ) -> None:
        self._stats = stats
        self._timeout = request_timeout
        self._on_state = on_state
        self.backend_name = masked_url(redis_url) if redis_url is not None else "in memory"
        self.backend_up = True

    async def call(self, operation: str, call: Awaitable[_T]) -> _T:
        """Await ``call``; BackendUnavailable when it takes longer than the request timeout."""
        started = time.perf_counter()
        failed = True
        error: BaseException | None = None
        try:
            async with asyncio.timeout(self._timeout):
                result = await call
            failed = False
            return result
        except TimeoutError as exc:
            error = BackendUnavailable(operation, exc)
            raise error from exc
        except asyncio.CancelledError:
            # The node is stopping: that says nothing about the backend.
            failed = False
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._stats.registry_call(operation, time.perf_counter() - started, failed)
            if failed:
                self.backend_state(False, error)

    def backend_state(self, up: bool, error: BaseException | None = None) -> None:
        # Logged once per transition, never per request.
        if up and not self.backend_up:
            logger.info("cluster backend is back")
        elif not up and self.backend_up:
            logger.warning(
                "cluster backend lost (%s: %s); requests that need it fail until it is back",
                self.backend_name,
                error,
            )
        if up != self.backend_up:
            self.backend_up = up
            self._on_state(up)
