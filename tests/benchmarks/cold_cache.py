"""Cold-cache benchmark (issue 5, case c): root-key provider calls made by 64 concurrent callers
over N resources whose root keys are customer-managed (the dev vault, RSA-2048), with a cold cache,
then again once the cache TTL has passed.

The broker runs in this process (a real grpc.aio server on a loopback port, embedded SQLite, audit
on, production settings but for a short cache TTL), because the provider calls are counted at the
provider itself: a thin counting wrapper around the real dev-vault provider, injected through
`serve(providers=...)`. The count is cross-checked against GetStatus key_cache.root_key_calls.
Set-up (resources, CMK enable, one data key per resource) runs in a first broker; the measured
rounds run in a second one over the same data, so the cache starts truly cold.

Each round: every caller decrypts one data key of every resource, starting at its own offset, so
callers collide on every cold key at once, and generates one data key per resource too. A
"resource key" is one stored resource-key version (its wrapped bytes). Target: exactly one
provider unwrap per resource key per TTL, in the first round and again after the TTL.

Run: python -m tests.benchmarks.cold_cache [--smoke] [--resources N] [--json PATH]
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from broker.api import key_broker_pb2 as pb
from broker.core.settings import Settings
from broker.providers import KeyDescription, KeyReference, RootKeyProvider
from broker.providers.dev_vault import FILE_NAME, DevVaultStore, dev_vault_provider
from broker.providers.registry import ProviderRegistry
from tests.benchmarks.common import environment, now_utc, parser, write_report
from tests.harness import BrokerUnderTest, running_broker

CALLERS = 64


class CountingProvider:
    """A real provider, with every call it receives counted (unwraps per stored key)."""

    def __init__(self, inner: RootKeyProvider) -> None:
        self.name = inner.name
        self._inner = inner
        self.wraps = 0
        self.describes = 0
        self.unwraps: Counter[str] = Counter()

    async def wrap(self, key: KeyReference, plaintext: bytes) -> bytes:
        self.wraps += 1
        return await self._inner.wrap(key, plaintext)

    async def unwrap(self, key: KeyReference, wrapped: bytes) -> bytes:
        # Counted before the call: a call made is a call made, whatever it answers.
        self.unwraps[hashlib.sha256(wrapped).hexdigest()[:16]] += 1
        return await self._inner.unwrap(key, wrapped)

    async def describe(self, key: KeyReference) -> KeyDescription:
        self.describes += 1
        return await self._inner.describe(key)


@dataclass
class Round:
    round: int
    calls: int
    seconds: float
    calls_per_s: float
    resource_keys_used: int
    provider_unwraps: int
    max_unwraps_per_key: int
    status_root_key_calls: int
    status_cache_entries: int


async def _setup(settings: Settings, n: int) -> list[pb.DecryptDataKeyRequest]:
    """N resources under one customer key, one data key each; returns the decrypt requests."""
    store = DevVaultStore(settings.data_dir / FILE_NAME)
    version = store.create_key("bench", "RSA", 2048).version
    key = pb.CustomerKeyReference(
        provider="dev-vault", vault="dev", key_name="bench", version=version
    )
    requests = []
    async with running_broker(settings, migrate=True) as kb:
        for i in range(n):
            await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id=f"r{i}"))
            await kb.stub.EnableCustomerManagedKey(
                pb.EnableCustomerManagedKeyRequest(name=f"resources/r{i}", key=key)
            )
            name = f"resources/r{i}/models/m1"
            made = await kb.stub.GenerateDataKey(pb.GenerateDataKeyRequest(name=name))
            requests.append(
                pb.DecryptDataKeyRequest(name=name, wrapped_data_key=made.wrapped_data_key)
            )
    return requests


async def _round(
    kb: BrokerUnderTest,
    counter: CountingProvider,
    requests: list[pb.DecryptDataKeyRequest],
    number: int,
    ttl: float,
) -> Round:
    n = len(requests)
    before = sum(counter.unwraps.values())
    seen_before = Counter(counter.unwraps)

    async def caller(offset: int) -> int:
        calls = 0
        for j in range(n):
            request = requests[(offset + j) % n]
            reply = await kb.stub.DecryptDataKey(request)
            assert reply.plaintext_data_key
            if j % 8 == 0:  # new data keys too: the current version, the other cache entry
                await kb.stub.GenerateDataKey(pb.GenerateDataKeyRequest(name=request.name))
                calls += 1
            calls += 1
        return calls

    started = time.perf_counter()
    calls = sum(await asyncio.gather(*(caller(i * n // CALLERS) for i in range(CALLERS))))
    elapsed = time.perf_counter() - started
    # Past the TTL within the round, a second load per key would be right, not a fault.
    assert elapsed < ttl, f"round {number} took {elapsed:.1f} s, longer than the TTL {ttl} s"
    this_round = counter.unwraps - seen_before
    status = await kb.stub.GetStatus(pb.GetStatusRequest())
    return Round(
        number,
        calls,
        elapsed,
        calls / elapsed,
        len(this_round),
        sum(counter.unwraps.values()) - before,
        max(this_round.values(), default=0),
        status.key_cache.root_key_calls,
        status.key_cache.entries,
    )


async def run(n: int, ttl: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        settings = Settings(
            data_dir=data,
            listen="127.0.0.1:0",
            database_url=f"sqlite+aiosqlite:///{data / 'keybroker.db'}",
            dev_vault=True,
            log_level="WARNING",
        )
        data.mkdir(mode=0o700)
        requests = await _setup(settings, n)
        counter = CountingProvider(dev_vault_provider(data))
        registry = ProviderRegistry({"dev-vault": lambda: counter})
        measured = replace(settings, cache_ttl=timedelta(seconds=ttl))
        rounds: list[Round] = []
        async with running_broker(measured, providers=registry) as kb:
            rounds.append(await _round(kb, counter, requests, 1, ttl))
            await asyncio.sleep(ttl + 0.2)  # every entry loaded in round 1 has now expired
            rounds.append(await _round(kb, counter, requests, 2, ttl))
    met = all(
        r.provider_unwraps == r.resource_keys_used and r.max_unwraps_per_key == 1 for r in rounds
    )
    # GetStatus counts root-key calls; every resource here is customer-managed, so each is one
    # provider call and the two counts must agree.
    status_agrees = rounds[-1].status_root_key_calls == sum(r.provider_unwraps for r in rounds)
    return {
        "benchmark": "cold_cache",
        "date": now_utc(),
        "environment": environment(),
        "resources": n,
        "callers": CALLERS,
        "cache_ttl_s": ttl,
        "figures": [asdict(r) for r in rounds],
        "ratios": {
            f"round {r.round} provider unwraps per resource key": r.provider_unwraps
            / max(1, r.resource_keys_used)
            for r in rounds
        },
        "target": "exactly one provider call per resource key per TTL",
        "met": met,
        "status_counter_agrees": status_agrees,
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        f"{report['resources']} CMK resources (dev vault, RSA-2048), {report['callers']} callers,"
        f" cache TTL {report['cache_ttl_s']} s"
    )
    print(
        f"{'round':>5}{'calls':>8}{'s':>7}{'calls/s':>9}{'res. keys':>11}{'unwraps':>9}"
        f"{'max/key':>9}{'status root_key_calls (cumul.)':>32}{'cache entries':>15}"
    )
    rows = report["figures"]
    for r in rows:
        print(
            f"{r['round']:>5}{r['calls']:>8}{r['seconds']:>7.2f}{r['calls_per_s']:>9.0f}"
            f"{r['resource_keys_used']:>11}{r['provider_unwraps']:>9}"
            f"{r['max_unwraps_per_key']:>9}{r['status_root_key_calls']:>32}"
            f"{r['status_cache_entries']:>15}"
        )
    print()
    for name, value in report["ratios"].items():
        print(f"{name:<56}{value:>8.2f}")
    print(
        f"GetStatus root_key_calls equals the provider's count: {report['status_counter_agrees']}"
    )
    print(f"target {report['target']}: {'met' if report['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__)
    p.add_argument("--resources", type=int, default=50, help="N (default 50)")
    args = p.parse_args(argv)
    n = 8 if args.smoke else args.resources
    report = asyncio.run(run(n, 3.0 if args.smoke else 30.0))
    print_table(report)
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
