"""Bounded retries with exponential backoff and full jitter around a provider.

Only ProviderUnavailable (unreachable, throttled) is retried; a revoked key is the customer's
decision and is reported at once. The budget is small (four attempts, about two seconds at most),
and a caller's gRPC deadline ends its wait sooner: the load it waits on carries on for others.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from broker.providers.interface import (
    KeyDescription,
    KeyReference,
    ProviderUnavailable,
    RootKeyProvider,
)

T = TypeVar("T")
ATTEMPTS = 4
BASE_DELAY = 0.1
MAX_DELAY = 1.0


class RetryingProvider:
    """Wraps a provider; same contract, with retries on ProviderUnavailable."""

    def __init__(self, inner: RootKeyProvider, *, attempts: int = ATTEMPTS) -> None:
        self.name = inner.name
        self._inner = inner
        self._attempts = attempts

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self._attempts):
            try:
                return await call()
            except ProviderUnavailable:
                if attempt == self._attempts - 1:
                    raise
            delay = min(MAX_DELAY, BASE_DELAY * 2**attempt)
            await asyncio.sleep(random.uniform(0, delay))  # noqa: S311 -- jitter, not crypto
        raise AssertionError("unreachable")

    async def wrap(self, key: KeyReference, plaintext: bytes) -> bytes:
        return await self._retry(lambda: self._inner.wrap(key, plaintext))

    async def unwrap(self, key: KeyReference, wrapped: bytes) -> bytes:
        return await self._retry(lambda: self._inner.unwrap(key, wrapped))

    async def describe(self, key: KeyReference) -> KeyDescription:
        return await self._retry(lambda: self._inner.describe(key))

    async def aclose(self) -> None:
        """Closes the wrapped provider's clients, if it holds any."""
        close = getattr(self._inner, "aclose", None)
        if close is not None:
            await close()
