"""The background probe of customer-managed keys: every KEYBROKER_CMK_PROBE_INTERVAL, each
customer key in use here is asked to wrap and unwrap a random value, once per key whatever the
traffic and however many resources share it.

A failed probe is recorded (broker.keys.customer_key_checks, which GetStatus reports) and drops
the cached keys of every resource under that key, so data-key calls meet the revocation within
one interval even when their keys are cached: their next call asks the vault, which refuses
(CUSTOMER_KEY_UNAVAILABLE). Nothing is deleted or changed in SQL. When access returns, the next
successful vault call clears the failure: a data-key call (once the cache's memory of the failure
has run out), or a probe, which also drops that memory so that calls resume at once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import anyio
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.core.errors import KeybrokerError
from broker.db.periodic import every
from broker.db.tables import CustomerKeyRow
from broker.keys.key_store import KeyStore, customer_reference
from broker.providers import KeyReference

log = logging.getLogger(__name__)

PROBES_AT_ONCE = 8
"""Keys probed concurrently: each probe is two vault round trips."""


@dataclass(frozen=True)
class ProbeCounts:
    keys: int
    failed: int


async def probe_all(sessions: async_sessionmaker[AsyncSession], keys: KeyStore) -> ProbeCounts:
    """Probes every customer key in use once; returns how many and how many failed."""
    async with sessions() as session:
        rows = (await session.scalars(select(CustomerKeyRow))).all()
    # key id -> (the key, the resources under it)
    by_key: dict[str, tuple[KeyReference, list[str]]] = {}
    for row in rows:
        reference = customer_reference(row)
        by_key.setdefault(reference.key_id, (reference, []))[1].append(row.resource_id)
    failed = 0
    gate = anyio.Semaphore(PROBES_AT_ONCE)

    async def probe(key_id: str) -> None:
        nonlocal failed
        reference, resources = by_key[key_id]
        async with gate:
            reason = await _probe(keys, resources[0], reference)
        before = keys.checks.get(key_id)
        keys.checks.probed(key_id, reason)
        if reason is not None:
            failed += 1
            log.warning("customer key %s failed its probe: %s", key_id, reason)
        elif before is None or before.ok:
            return
        else:
            log.info("customer key %s works again", key_id)
        # Failed: cached keys go, so data-key calls meet the refusal now. Works again: the
        # failures remembered go too, so data-key calls resume now.
        for rid in resources:
            keys.forget(rid)

    async with anyio.create_task_group() as tg:
        for key_id in by_key:
            tg.start_soon(probe, key_id)
    return ProbeCounts(len(by_key), failed)


async def _probe(keys: KeyStore, resource_id: str, reference: KeyReference) -> str | None:
    """None when `reference` wraps and unwraps; else the reason a data-key call would get."""
    root = keys.root_of(resource_id, reference.key_id, reference)
    value = os.urandom(32)
    try:
        if await root.unwrap(await root.wrap(value)) != value:
            return "STORED_KEY_CORRUPT"
    except KeybrokerError as exc:
        return exc.reason
    return None


async def run(
    sessions: async_sessionmaker[AsyncSession], keys: KeyStore, interval: timedelta
) -> None:
    """Probes every `interval` until cancelled; a round never takes the broker down: whatever it
    fails with is logged and the next round tries again (broker.db.periodic)."""
    await every(
        interval, lambda: probe_all(sessions, keys), "customer key probes", tolerated=(Exception,)
    )
