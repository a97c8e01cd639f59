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

from broker.api import key_broker_pb2 as pb
from broker.audit import AuditEvent, AuditLog
from broker.errors import KeybrokerError
from broker.names import resource_name
from workers.blobs import BlobStore
from workers.objects import ObjectStore

log = logging.getLogger(__name__)

BATCH = 500
CALLER = "keybroker-retention"


@dataclass(frozen=True)
class SweepCounts:
    shredded: int
    stale_temporaries: int
    purged: int = 0


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
        await _audit(sessions, audit, "ExpireAnalyzeResults", None, shredded)
        log.info("retention: %d expired analyze results shredded", shredded)
    purged = await purge_destroyed_resources(objects, sessions, audit)
    return SweepCounts(shredded, stale, purged)


async def purge_destroyed_resources(
    objects: ObjectStore, sessions: async_sessionmaker[AsyncSession], audit: AuditLog
) -> int:
    """Objects of a resource whose deletion is scheduled are already unreadable (the broker
    refuses their data keys); once the broker has destroyed the resource, they are purged."""
    purged = 0
    for resource_id in await objects.resource_ids():
        if await objects.broker.resource_state(resource_id) != pb.Resource.DESTROYED:
            continue
        count = await objects.purge_resource(resource_id)
        await _audit(sessions, audit, "PurgeResourceObjects", resource_name(resource_id), count)
        log.info("purged %d objects of destroyed %s", count, resource_name(resource_id))
        purged += count
    return purged


async def _audit(
    sessions: async_sessionmaker[AsyncSession],
    audit: AuditLog,
    operation: str,
    resource: str | None,
    count: int,
) -> None:
    event = AuditEvent(operation, CALLER, f"sweep-{anyio.current_time():.0f}", resource=resource)
    event.item_count = count
    async with sessions.begin() as session:
        await audit.record_in(session, event)


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
        except (SQLAlchemyError, OSError, KeybrokerError):
            log.exception("retention sweep failed; retrying at the next tick")
        await anyio.sleep(interval.total_seconds())
