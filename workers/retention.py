"""Retention of analyze results: expired results are shredded in batches, and audited.

An operation expires `result_retention` (24 hours) after it completed, or after its last update
while it has not. Readers already treat an expired operation as NOT_FOUND (workers.objects); the
sweep makes it so in storage, batch by batch, in two steps per batch:

1. shred: in one transaction, the batch's rows are marked deleted and their wrapped data keys set
   to NULL (from that commit on, the blobs can never be opened);
2. remove: the batch's blobs are deleted (up to REMOVE_CONCURRENCY at once, each durable when it
   returns), then the rows whose blob is gone, in one statement.

No job per row: each sweep begins by removing expired rows that are shredded but still there,
which is the retry. So a sweep killed between the steps leaves shredded rows that the next sweep
removes, and a blob that fails to go keeps its row until it goes. A row deleted by
DeleteAnalyzeResult (with its own remove-blob job) that has also expired may be removed by
either; both are idempotent. `sweep` returns counts, like a retention function should.

Each sweep that shredded something, and each purge that removed objects, is audited through an
AuditRecorder (workers.audit_recorder): the broker's chained trail, in process or over gRPC. The
record follows the work it reports: if it cannot be written the sweep fails (logged, and retried
at the next tick, which finds nothing left to record for rows already shredded).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import anyio
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.api import key_broker_pb2 as pb
from broker.core.audit_event import AuditEvent
from broker.core.names import resource_name
from broker.db.periodic import every
from workers.audit_recorder import AuditRecorder
from workers.blobs import BlobStore
from workers.objects import ObjectStore
from workers.tables import AnalyzeOperationRow

log = logging.getLogger(__name__)

BATCH = 500
REMOVE_CONCURRENCY = 32
"""Blob deletes in flight at once: each ends with a directory fsync, which the file system
groups when several are pending (about 2.5x the rate of one at a time on ext4)."""
CALLER = "keybroker-retention"


@dataclass(frozen=True)
class SweepCounts:
    shredded: int
    stale_temporaries: int
    purged: int = 0
    removed: int = 0
    """Expired rows whose blob and row are gone (this sweep's and any left by an earlier one)."""


async def sweep(
    objects: ObjectStore,
    blobs: BlobStore,
    sessions: async_sessionmaker[AsyncSession],
    audit: AuditRecorder,
) -> SweepCounts:
    """Removes what an earlier sweep shredded but left, then shreds and removes every expired
    result batch by batch (see the module docstring), and clears writes killed mid-way."""
    now = objects.now()  # the clock the store's readers judge expiry by
    removed = 0
    while True:
        leftovers = await _leftover_batch(sessions, now)
        count = await _remove(sessions, blobs, leftovers)
        removed += count
        if len(leftovers) < BATCH or count == 0:
            break
    shredded = 0
    while True:
        batch = await shred_batch(sessions, now)
        shredded += len(batch)
        removed += await _remove(sessions, blobs, batch)
        if len(batch) < BATCH:
            break
    if shredded:
        await _audit(audit, "ExpireAnalyzeResults", None, shredded)
        log.info("retention: %d expired analyze results shredded", shredded)
    stale = await blobs.remove_stale_temporaries(older_than=3600)
    purged = await purge_destroyed_resources(objects, audit)
    return SweepCounts(shredded, stale, purged, removed)


Doomed = Sequence[tuple[str, str | None]]
"""(operation name, blob key) of shredded rows, to remove."""


async def shred_batch(sessions: async_sessionmaker[AsyncSession], now: datetime) -> Doomed:
    """Step 1, one batch in one transaction: expired live rows lose their wrapped data key."""
    table = AnalyzeOperationRow
    async with sessions.begin() as session:
        rows = (
            await session.execute(
                select(table.name, table.blob_key)
                .where(table.expire_time <= now, table.deleted.is_(False))
                .order_by(table.expire_time)
                .limit(BATCH)
                .with_for_update()
            )
        ).all()
        if rows:
            await session.execute(
                update(table)
                .where(table.name.in_([name for name, _ in rows]))
                .values(deleted=True, wrapped_data_key=None)
                .execution_options(synchronize_session=False)
            )
    return [(name, blob_key) for name, blob_key in rows]


async def _leftover_batch(sessions: async_sessionmaker[AsyncSession], now: datetime) -> Doomed:
    """Expired rows already shredded (by a sweep cut off before step 2, or deleted on request
    and expired since): their blobs and rows are still to go."""
    table = AnalyzeOperationRow
    async with sessions() as session:
        rows = await session.execute(
            select(table.name, table.blob_key)
            .where(table.expire_time <= now, table.deleted.is_(True))
            .order_by(table.expire_time)
            .limit(BATCH)
        )
        return [(name, blob_key) for name, blob_key in rows]


async def _remove(
    sessions: async_sessionmaker[AsyncSession], blobs: BlobStore, doomed: Doomed
) -> int:
    """Step 2: the blobs of shredded rows, then the rows whose blob is gone; returns how many."""
    gone: list[str] = []
    queue = iter(doomed)

    # A few removers share one iterator (not a task per blob): the sweep's own cost per row
    # stays small beside the file system's.
    async def remover() -> None:
        for name, blob_key in queue:
            try:
                if blob_key:
                    await blobs.delete(blob_key)  # False when already gone: fine
            except (OSError, ValueError):
                # The row stays, so the blob is tried again at the next sweep.
                log.exception("retention: could not remove the blob of %s", name)
                continue
            gone.append(name)

    async with anyio.create_task_group() as tg:
        for _ in range(min(REMOVE_CONCURRENCY, len(doomed))):
            tg.start_soon(remover)
    if gone:
        table = AnalyzeOperationRow
        async with sessions.begin() as session:
            await session.execute(
                delete(table)
                .where(table.name.in_(gone), table.deleted.is_(True))
                .execution_options(synchronize_session=False)
            )
    return len(gone)


async def purge_destroyed_resources(objects: ObjectStore, audit: AuditRecorder) -> int:
    """Objects of a resource whose deletion is scheduled are already unreadable (the broker
    refuses their data keys); once the broker has destroyed the resource, they are purged."""
    purged = 0
    for resource_id in await objects.resource_ids():
        if await objects.broker.resource_state(resource_id) != pb.Resource.DESTROYED:
            continue
        count = await objects.purge_resource(resource_id)
        if not count:
            continue  # another sweep purged them meanwhile: it made the record
        await _audit(audit, "PurgeResourceObjects", resource_name(resource_id), count)
        log.info("purged %d objects of destroyed %s", count, resource_name(resource_id))
        purged += count
    return purged


async def _audit(audit: AuditRecorder, operation: str, resource: str | None, count: int) -> None:
    # Unique per record: two sweeps in one second (a replica's, an operator's) stay apart.
    event = AuditEvent(operation, CALLER, f"sweep-{os.urandom(6).hex()}", resource=resource)
    event.item_count = count
    await audit.record(event)


async def run(
    objects: ObjectStore,
    blobs: BlobStore,
    sessions: async_sessionmaker[AsyncSession],
    audit: AuditRecorder,
    interval: timedelta,
) -> None:
    """Sweeps every `interval` until cancelled; a failed sweep is logged and retried at the next
    tick (broker.db.periodic; a sweep interrupted mid-commit leaks nothing)."""
    await every(interval, lambda: sweep(objects, blobs, sessions, audit), "retention sweep")
