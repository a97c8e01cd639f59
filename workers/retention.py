"""Retention of analyze results: expired results are shredded in batches, and audited.

An operation expires `result_retention` (24 hours) after it completed, or after its last update
while it has not. Readers already treat an expired operation as NOT_FOUND (workers.objects); the
sweep makes it so in storage: it destroys the wrapped data key, then (by job) the blob, then the
row. `sweep` is idempotent and returns counts, like a retention function should.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import anyio
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.audit import AuditEvent, AuditLog
from workers.blobs import BlobStore
from workers.objects import ObjectStore

log = logging.getLogger(__name__)

BATCH = 500
CALLER = "keybroker-retention"


@dataclass(frozen=True)
class SweepCounts:
    shredded: int
    stale_temporaries: int


async def sweep(
    objects: ObjectStore,
    blobs: BlobStore,
    sessions: async_sessionmaker[AsyncSession],
    audit: AuditLog,
) -> SweepCounts:
    """Shreds every expired result (batch by batch) and clears writes killed mid-way."""
    shredded = 0
    while True:
        count = await objects.shred_expired(BATCH)
        shredded += count
        if count < BATCH:
            break
    stale = await blobs.remove_stale_temporaries(older_than=3600)
    if shredded:
        event = AuditEvent("ExpireAnalyzeResults", CALLER, f"sweep-{anyio.current_time():.0f}")
        event.item_count = shredded
        async with sessions.begin() as session:
            await audit.record_in(session, event)
        log.info("retention: %d expired analyze results shredded", shredded)
    return SweepCounts(shredded, stale)


async def run(
    objects: ObjectStore,
    blobs: BlobStore,
    sessions: async_sessionmaker[AsyncSession],
    audit: AuditLog,
    interval: timedelta,
) -> None:
    """Sweeps every `interval` until cancelled; a failed sweep is logged and retried."""
    while True:
        try:
            with anyio.CancelScope(shield=True):  # a sweep interrupted mid-commit leaks nothing
                await sweep(objects, blobs, sessions, audit)
        except (SQLAlchemyError, OSError):
            log.exception("retention sweep failed; retrying at the next tick")
        await anyio.sleep(interval.total_seconds())
