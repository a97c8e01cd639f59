"""broker.keys.key_cache.KeyCache with a fake clock, and one-load-per-key against a real broker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from broker.api import key_broker_pb2 as pb
from broker.keys.key_cache import KeyCache
from broker.keys.key_store import UsableKey
from tests.harness import BrokerUnderTest

WAITERS = 64


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Revoked(Exception):
    """A failure the cache is told to remember."""


class Loader:
    """Counts calls; returns `value` (or raises `error`), optionally after `gate` is set."""

    def __init__(
        self,
        value: str = "v",
        *,
        error: Exception | None = None,
        gate: asyncio.Event | None = None,
    ) -> None:
        self.value = value
        self.error = error
        self.gate = gate
        self.calls = 0
        self.started = asyncio.Event()

    async def __call__(self) -> str:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.value


def make_cache(
    clock: FakeClock,
    *,
    ttl: float = 60.0,
    max_entries: int = 100,
    failure_ttl: float = 5.0,
    remember_failure: Callable[[Exception], bool] = lambda exc: isinstance(exc, Revoked),
) -> KeyCache[str, str]:
    return KeyCache(
        ttl=ttl,
        max_entries=max_entries,
        failure_ttl=failure_ttl,
        remember_failure=remember_failure,
        clock=clock,
    )


def loader_for(value: str) -> Callable[[], Awaitable[str]]:
    async def load() -> str:
        return value

    return load


async def wait_until(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


@pytest.mark.asyncio
async def test_hits_misses_and_loads_are_counted() -> None:
    cache = make_cache(FakeClock())
    load = Loader("a")
    assert await cache.get("k", load) == "a"
    assert (cache.counters.hits, cache.counters.misses, cache.counters.loads) == (0, 1, 1)
    assert await cache.get("k", load) == "a"
    assert await cache.get("k", load) == "a"
    assert (cache.counters.hits, cache.counters.misses, cache.counters.loads) == (2, 1, 1)
    assert load.calls == 1
    assert await cache.get("other", loader_for("b")) == "b"
    assert (cache.counters.hits, cache.counters.misses, cache.counters.loads) == (2, 2, 2)
    assert len(cache) == 2
    assert cache.counters.load_failures == 0


@pytest.mark.asyncio
async def test_entries_expire_after_the_ttl() -> None:
    clock = FakeClock()
    cache = make_cache(clock, ttl=10.0)
    load = Loader("a")
    await cache.get("k", load)
    clock.advance(9.999)
    await cache.get("k", load)
    assert load.calls == 1
    clock.advance(0.001)  # exactly at expiry: expired
    load.value = "b"
    assert await cache.get("k", load) == "b"
    assert load.calls == 2
    assert (cache.counters.hits, cache.counters.misses, cache.counters.loads) == (1, 2, 2)
    clock.advance(5)
    assert await cache.get("k", load) == "b"  # the reload got a fresh ttl
    assert load.calls == 2


@pytest.mark.asyncio
async def test_size_bound_evicts_the_least_recently_used() -> None:
    cache = make_cache(FakeClock(), max_entries=3)
    loads = {k: Loader(k) for k in "abcd"}
    for k in "abc":
        await cache.get(k, loads[k])
    await cache.get("a", loads["a"])  # a is now the most recently used; b the least
    await cache.get("d", loads["d"])
    assert len(cache) == 3
    for k in "acd":
        await cache.get(k, loads[k])
    assert [loads[k].calls for k in "abcd"] == [1, 1, 1, 1]
    # Recency is now a, c, d: b (evicted) loads again and evicts a.
    await cache.get("b", loads["b"])
    assert loads["b"].calls == 2
    assert len(cache) == 3
    for k in "cdb":
        await cache.get(k, loads[k])
    assert [loads[k].calls for k in "abcd"] == [1, 2, 1, 1]
    await cache.get("a", loads["a"])
    assert loads["a"].calls == 2


@pytest.mark.asyncio
async def test_concurrent_misses_share_one_load() -> None:
    cache = make_cache(FakeClock())
    gate = asyncio.Event()
    load = Loader("shared", gate=gate)
    waiters = [asyncio.create_task(cache.get("k", load)) for _ in range(WAITERS)]
    await wait_until(lambda: cache.counters.misses == WAITERS and load.started.is_set())
    assert not any(w.done() for w in waiters)  # all waiting on the one load
    gate.set()
    assert await asyncio.gather(*waiters) == ["shared"] * WAITERS
    assert load.calls == 1
    assert cache.counters.loads == 1
    assert cache.counters.misses == WAITERS
    assert await cache.get("k", load) == "shared"
    assert cache.counters.hits == 1


@pytest.mark.asyncio
async def test_a_failing_load_reaches_every_waiter() -> None:
    cache = make_cache(FakeClock(), remember_failure=lambda _exc: False)
    gate = asyncio.Event()
    error = RuntimeError("vault unreachable")
    load = Loader(gate=gate, error=error)
    waiters = [asyncio.create_task(cache.get("k", load)) for _ in range(WAITERS)]
    await wait_until(lambda: cache.counters.misses == WAITERS)
    gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(r is error for r in results)
    assert load.calls == 1
    assert cache.counters.load_failures == 1
    assert len(cache) == 0  # not remembered: the next get loads again
    load.error = None
    assert await cache.get("k", load) == "v"
    assert load.calls == 2


@pytest.mark.asyncio
async def test_failures_are_remembered_only_when_accepted() -> None:
    clock = FakeClock()
    cache = make_cache(clock, ttl=60.0, failure_ttl=5.0)

    unremembered = Loader(error=ValueError("unknown resource"))
    for _ in range(3):
        with pytest.raises(ValueError, match="unknown resource"):
            await cache.get("plain", unremembered)
    assert unremembered.calls == 3

    revoked = Loader(error=Revoked("key disabled"))
    with pytest.raises(Revoked):
        await cache.get("cmk", revoked)
    clock.advance(4.9)
    for _ in range(3):
        with pytest.raises(Revoked):
            await cache.get("cmk", revoked)
    assert revoked.calls == 1  # served from the cache: the vault is not hammered
    assert cache.counters.hits == 3

    clock.advance(0.1)  # failure_ttl passed, much shorter than the ttl
    revoked.error = None
    revoked.value = "back"
    assert await cache.get("cmk", revoked) == "back"
    assert revoked.calls == 2
    clock.advance(59)
    assert await cache.get("cmk", revoked) == "back"
    assert revoked.calls == 2
    assert cache.counters.load_failures == 4


@pytest.mark.asyncio
async def test_a_cancelled_waiter_does_not_cancel_the_shared_load() -> None:
    cache = make_cache(FakeClock())
    gate = asyncio.Event()
    load = Loader("kept", gate=gate)
    first = asyncio.create_task(cache.get("k", load))
    second = asyncio.create_task(cache.get("k", load))
    await wait_until(lambda: cache.counters.misses == 2 and load.started.is_set())
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.set()
    assert await second == "kept"
    assert load.calls == 1
    assert await cache.get("k", load) == "kept"  # stored for later callers
    assert load.calls == 1


@pytest.mark.asyncio
async def test_a_load_whose_only_waiter_was_cancelled_still_completes() -> None:
    cache = make_cache(FakeClock())
    gate = asyncio.Event()
    load = Loader("late", gate=gate)
    only = asyncio.create_task(cache.get("k", load))
    await wait_until(load.started.is_set)
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    gate.set()
    await wait_until(lambda: len(cache) == 1)
    assert await cache.get("k", load) == "late"
    assert load.calls == 1


@pytest.mark.asyncio
async def test_invalidate_drops_matching_entries() -> None:
    cache: KeyCache[tuple[str, int], str] = KeyCache(ttl=60.0, max_entries=100, clock=FakeClock())
    for rid in ("r1", "r2"):
        for v in (0, 1, 2):
            await cache.get((rid, v), loader_for(f"{rid}/{v}"))
    assert len(cache) == 6
    assert cache.invalidate(lambda k: k[0] == "r1") == 3
    assert len(cache) == 3
    assert cache.invalidate(lambda k: k[0] == "r1") == 0
    loads = cache.counters.loads
    assert await cache.get(("r2", 1), loader_for("new")) == "r2/1"  # untouched
    assert await cache.get(("r1", 1), loader_for("new")) == "new"  # reloaded
    assert cache.counters.loads == loads + 1
    cache.clear()
    assert len(cache) == 0


@pytest.mark.asyncio
async def test_concurrent_decrypts_on_a_cold_cache_load_once(
    broker: BrokerUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    await broker.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    name = "resources/r1/models/m1"
    key = await broker.stub.GenerateDataKey(pb.GenerateDataKeyRequest(name=name))
    keys = broker.running.broker.keys
    cache = keys.cache
    cache.clear()
    loads, misses = cache.counters.loads, cache.counters.misses

    # The real load, held until every call has missed, so that all 64 overlap for certain.
    gate = asyncio.Event()
    real_load = keys._load

    async def held_load(*args: Any) -> UsableKey:
        await gate.wait()
        return await real_load(*args)

    monkeypatch.setattr(keys, "_load", held_load)
    request = pb.DecryptDataKeyRequest(name=name, wrapped_data_key=key.wrapped_data_key)
    calls = asyncio.gather(*(broker.stub.DecryptDataKey(request) for _ in range(WAITERS)))
    try:
        for _ in range(500):
            if cache.counters.misses - misses == WAITERS:
                break
            await asyncio.sleep(0.01)
        assert cache.counters.misses - misses == WAITERS
    finally:
        gate.set()
        replies = await calls
    assert all(r.plaintext_data_key == key.plaintext_data_key for r in replies)
    assert all(r.key_id == key.key_id for r in replies)
    assert cache.counters.loads - loads == 1
    assert cache.counters.load_failures == 0
