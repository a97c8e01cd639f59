"""What each kind of job does. Every handler is idempotent and resumable: it saves a cursor as it
goes, and running it again from any point (after a crash, a lost lease) reaches the same end."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.api import key_broker_pb2 as pb
from broker.core.names import Purpose, parse_object
from workers import jobs
from workers.broker_client import BrokerClient
from workers.objects import ObjectStore
from workers.tables import AnalyzeOperationRow, JobRow, ModelRow

log = logging.getLogger(__name__)

BATCH = 256
CALLER = "keybroker-workers"
Progress = Callable[[str, int, int], Awaitable[None]]
"""(cursor, done, total): records how far a job has got; raises if the lease was lost."""


@dataclass(frozen=True)
class JobContext:
    sessions: async_sessionmaker[AsyncSession]
    objects: ObjectStore
    broker: BrokerClient


async def _objects_after(
    session: AsyncSession, resource_id: str, after: str, limit: int
) -> list[tuple[str, bytes, str, str]]:
    """(name, wrapped data key, key id, blob key) of the resource's live objects after `after`,
    models and results together in name order."""
    out: list[tuple[str, bytes, str, str]] = []
    for table in (ModelRow, AnalyzeOperationRow):
        rows = await session.execute(
            select(table.name, table.wrapped_data_key, table.key_id, table.blob_key)
            .where(
                table.resource_id == resource_id,
                table.name > after,
                table.wrapped_data_key.is_not(None),
            )
            .order_by(table.name)
            .limit(limit)
        )
        out.extend((n, w, k or "", b or "") for n, w, k, b in rows if w is not None)
    out.sort()
    return out[:limit]


async def _count(session: AsyncSession, resource_id: str, after: str) -> int:
    """The resource's live objects after `after` (those a resumed job has still to do)."""
    total = 0
    for table in (ModelRow, AnalyzeOperationRow):
        total += (
            await session.scalar(
                select(func.count())
                .select_from(table)
                .where(
                    table.resource_id == resource_id,
                    table.name > after,
                    table.wrapped_data_key.is_not(None),
                )
            )
            or 0
        )
    return total


async def remove_blob(job: JobRow, ctx: JobContext, progress: Progress) -> None:
    payload = json.loads(job.payload)
    await ctx.objects.remove_blob(payload.get("blob_key", ""), payload.get("operation"))


async def rewrap(job: JobRow, ctx: JobContext, progress: Progress) -> None:
    """Moves every data key of the resource to its current resource-key version through the
    batch re-wrap RPC, then schedules destruction of versions nothing references any more."""
    cursor, done = job.cursor, job.done
    async with ctx.sessions() as session:
        total = await _count(session, job.resource_id, cursor) + done
    while True:
        async with ctx.sessions() as session:
            batch = await _objects_after(session, job.resource_id, cursor, BATCH)
        if not batch:
            break
        results = await ctx.broker.rewrap_batch([(n, w) for n, w, _, _ in batch], CALLER)
        async with ctx.sessions.begin() as session:
            for (name, wrapped, _, _), result in zip(batch, results, strict=True):
                if result.error is not None:
                    raise result.error
                if result.wrapped is None:
                    continue  # already current
                models = parse_object(name).purpose is Purpose.MODELS
                table = ModelRow if models else AnalyzeOperationRow
                # Only if unchanged meanwhile (a concurrent upload or delete wins).
                await session.execute(
                    update(table)
                    .where(table.name == name, table.wrapped_data_key == wrapped)
                    .values(wrapped_data_key=result.wrapped, key_id=result.key_id)
                    .execution_options(synchronize_session=False)
                )
        cursor, done = batch[-1][0], done + len(batch)
        await progress(cursor, done, max(total, done))
    await _destroy_unreferenced_versions(job.resource_id, ctx)


async def _destroy_unreferenced_versions(resource_id: str, ctx: JobContext) -> None:
    async with ctx.sessions() as session:
        referenced = set(
            await session.scalars(
                select(ModelRow.key_id).where(ModelRow.resource_id == resource_id).distinct()
            )
        ) | {
            k
            for k in await session.scalars(
                select(AnalyzeOperationRow.key_id)
                .where(AnalyzeOperationRow.resource_id == resource_id)
                .distinct()
            )
            if k
        }
    for purpose in ("models", "results"):
        for version in await ctx.broker.key_versions(resource_id, purpose):
            unused = version.name not in referenced
            if version.state == pb.ResourceKeyVersion.ENABLED and not version.current and unused:
                log.info("scheduling destruction of %s (no data key uses it)", version.name)
                await ctx.broker.destroy_version(version.name)


async def reencrypt(job: JobRow, ctx: JobContext, progress: Progress) -> None:
    """Copies every object of the resource under a fresh data key, then points the object at
    the copy: the old copy stays readable until the moment the new one takes over."""
    cursor, done = job.cursor, job.done
    async with ctx.sessions() as session:
        total = await _count(session, job.resource_id, cursor) + done
    while True:
        async with ctx.sessions() as session:
            batch = await _objects_after(session, job.resource_id, cursor, 1)
        if not batch:
            return
        name, wrapped, _, blob_key = batch[0]
        obj = parse_object(name)
        plaintext = await ctx.objects.open_decrypted(obj, blob_key, wrapped, CALLER)
        stored = await ctx.objects.write_encrypted(obj, plaintext, CALLER)
        await ctx.objects.swap_object(name, blob_key, stored)
        cursor, done = name, done + 1
        await progress(cursor, done, max(total, done))


Handler = Callable[[JobRow, JobContext, Progress], Awaitable[None]]
HANDLERS: dict[str, Handler] = {
    jobs.REMOVE_BLOB: remove_blob,
    jobs.REWRAP: rewrap,
    jobs.REENCRYPT: reencrypt,
}
