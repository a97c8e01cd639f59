"""A TTL- and size-bounded in-memory cache with one load in flight per key.

Holds unwrapped resource keys (as AEAD objects) in broker memory only. However many callers miss
on the same key at once, one loader runs and they all await its result. A failed load that
`remember_failure` accepts is remembered for `failure_ttl` (so a revoked or unreachable root key
is not hammered) and re-raised to callers; other failures (an unknown resource, say) are not.

Caches are per process: a change made through another replica reaches this one within `ttl`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class CacheCounters:
    """Cumulative counts since start: hits, misses, and loads (calls down to the root key)."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_failures: int = 0


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class KeyCache(Generic[K, V]):
    """Maps keys to values loaded on demand; see the module docstring."""

    def __init__(
        self,
        *,
        ttl: float,
        max_entries: int,
        failure_ttl: float = 5.0,
        remember_failure: Callable[[Exception], bool] = lambda _exc: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._failure_ttl = failure_ttl
        self._remember_failure = remember_failure
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V | _Failure]] = OrderedDict()
        self._inflight: dict[K, asyncio.Task[V]] = {}
        self.counters = CacheCounters()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        """The cached value for `key`, loading it with `load()` on a miss or after expiry."""
        entry = self._entries.get(key)
        if entry is not None and entry[0] > self._clock():
            self.counters.hits += 1
            self._entries.move_to_end(key)
            value = entry[1]
            if isinstance(value, _Failure):
                raise value.error
            return value
        self.counters.misses += 1
        task = self._inflight.get(key)
        if task is None:
            # The load runs in its own task: a waiter that is cancelled must not cancel the load
            # that the other waiters share. The task is owned by _inflight until it finishes.
            task = asyncio.create_task(self._load(key, load))
            self._inflight[key] = task
            task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def _load(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        self.counters.loads += 1
        try:
            value = await load()
        except Exception as exc:
            self.counters.load_failures += 1
            if self._remember_failure(exc):
                self._store(key, _Failure(exc), self._failure_ttl)
            raise
        else:
            self._store(key, value, self._ttl)
            return value
        finally:
            del self._inflight[key]

    def _store(self, key: K, value: V | _Failure, ttl: float) -> None:
        self._entries[key] = (self._clock() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def invalidate(self, predicate: Callable[[K], bool], *, failures_too: bool = True) -> int:
        """Drops every entry whose key matches; returns how many. For state changes (rare).

        `failures_too=False` keeps remembered failures (when one failure is the news)."""
        doomed = [
            k
            for k, (_, value) in self._entries.items()
            if predicate(k) and (failures_too or not isinstance(value, _Failure))
        ]
        for k in doomed:
            del self._entries[k]
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()


def _retrieve(task: asyncio.Task[object]) -> None:
    """Marks a load's exception retrieved even if every waiter was cancelled meanwhile."""
    if not task.cancelled():
        task.exception()
