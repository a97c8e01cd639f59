"""Stored objects: models and analyze results, each encrypted under a fresh data key.

Writing an object: a data key comes from the broker (GenerateDataKey for the object's name), the
bytes are encrypted as they stream in (workers.streaming_aead, associated data = the object's
name) into a blob that becomes visible only when complete, and then one transaction records the
blob and the wrapped data key (and, on replacement, a job to remove the old blob). A failure or a
kill at any point leaves either the old object or the new one, never a mix.

Reading decrypts the data key through the broker and streams only authenticated plaintext.
Deleting destroys the wrapped data key first (the object is unreadable from then on), then the
blob, then the row; see workers.retention for expiry.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.core.detached import DetachedWork
from broker.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, KeybrokerError
from broker.core.names import ObjectName, Purpose, parse_object, parse_resource
from workers import jobs
from workers.blobs import BlobNotFound, BlobStore
from workers.broker_client import BrokerClient
from workers.errors import StoredObjectCorrupt, analyze_result_not_found, model_not_found
from workers.streaming_aead import StreamAuthenticationError, decrypt_stream, encrypt_stream
from workers.tables import AnalyzeOperationRow, ModelRow

FINAL = ("succeeded", "failed", "canceled")


def model_name(name: str) -> ObjectName:
    obj = parse_object(name)
    if obj.purpose is not Purpose.MODELS:
        raise InvalidArgument("INVALID_NAME", "name must be resources/{resource}/models/{model}")
    return obj


def result_name(name: str) -> ObjectName:
    obj = parse_object(name)
    if obj.purpose is not Purpose.RESULTS:
        raise InvalidArgument(
            "INVALID_NAME", "name must be resources/{resource}/analyzeResults/{analyze_result}"
        )
    return obj


def _closable(stream: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """The streams here are async generators; typed as such so `aclosing` can close them."""
    return cast(AsyncGenerator[bytes, None], stream)


def new_blob_key(resource_id: str) -> str:
    """Blob keys are fresh for every write (never reused), whatever the object's name."""
    return f"{resource_id}/{os.urandom(16).hex()}"


@dataclass(frozen=True)
class Stored:
    blob_key: str
    wrapped: bytes
    key_id: str
    size: int


class ObjectStore:
    """See the module docstring."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        blobs: BlobStore,
        broker: BrokerClient,
        segment_size: int,
        retention: timedelta,
        now: Callable[[], datetime],
    ) -> None:
        self._sessions = sessions
        self.blobs = blobs
        self.broker = broker
        self._segment_size = segment_size
        self._retention = retention
        # The clock expiry is judged by (the retention sweep reads it too; tests move it).
        self.now = now
        # Database work that must not be cut short by a cancelled RPC (broker.core.detached).
        self.detached = DetachedWork()

    # -- encryption ------------------------------------------------------------------------------

    async def write_encrypted(
        self, obj: ObjectName, chunks: AsyncIterable[bytes], caller: str
    ) -> Stored:
        """Encrypts `chunks` under a fresh data key into a new blob; returns what to record."""
        key = await self.broker.generate(obj.name, caller)
        size = 0

        async def counted() -> AsyncIterator[bytes]:
            nonlocal size
            async for chunk in chunks:
                size += len(chunk)
                yield chunk

        blob_key = new_blob_key(obj.resource_id)
        ciphertext = _closable(
            encrypt_stream(key.plaintext, obj.name.encode(), counted(), self._segment_size)
        )
        async with aclosing(ciphertext):
            await self.blobs.write(blob_key, ciphertext)
        return Stored(blob_key, key.wrapped, key.key_id, size)

    async def open_decrypted(
        self, obj: ObjectName, blob_key: str, wrapped: bytes, caller: str
    ) -> AsyncIterator[bytes]:
        """Unwraps the data key now (so a refusal comes before any byte is sent), and returns
        the plaintext stream, which raises StoredObjectCorrupt at the first bad segment."""
        key = await self.broker.decrypt(obj.name, wrapped, caller)
        return self._plaintext(obj, blob_key, key)

    async def _plaintext(self, obj: ObjectName, blob_key: str, key: bytes) -> AsyncIterator[bytes]:
        blob = _closable(self.blobs.read(blob_key))
        plaintext = _closable(decrypt_stream(key, obj.name.encode(), blob, self._segment_size))
        try:
            async with aclosing(blob), aclosing(plaintext):
                async for chunk in plaintext:
                    yield chunk
        except (StreamAuthenticationError, BlobNotFound):
            raise StoredObjectCorrupt from None

    # -- models ----------------------------------------------------------------------------------

    async def put_model(self, name: str, chunks: AsyncIterable[bytes], caller: str) -> ModelRow:
        obj = model_name(name)
        stored = await self.write_encrypted(obj, chunks, caller)
        return await self.detached.run(self._commit_model(obj, stored))

    async def _commit_model(self, obj: ObjectName, stored: Stored) -> ModelRow:
        now = self.now()
        async with self._sessions.begin() as session:
            row = await session.get(ModelRow, obj.name, with_for_update=True)
            if row is None:
                row = ModelRow(name=obj.name, resource_id=obj.resource_id)
                session.add(row)
            else:
                # The old content's key dies with this transaction; its blob goes by job.
                jobs.add_job(session, jobs.REMOVE_BLOB, obj.resource_id, now, blob_key=row.blob_key)
            row.blob_key, row.wrapped_data_key = stored.blob_key, stored.wrapped
            row.key_id, row.size_bytes, row.create_time = stored.key_id, stored.size, now
        return row

    async def get_model(self, name: str) -> ModelRow:
        obj = model_name(name)
        async with self._sessions() as session:
            row = await session.get(ModelRow, obj.name)
        if row is None or row.wrapped_data_key is None:
            raise model_not_found(obj.name)
        return row

    async def read_model(self, row: ModelRow, caller: str) -> AsyncIterator[bytes]:
        assert row.wrapped_data_key is not None
        obj = model_name(row.name)
        return await self.open_decrypted(obj, row.blob_key, row.wrapped_data_key, caller)

    async def list_models(self, resource_id: str, after: str, limit: int) -> list[ModelRow]:
        async with self._sessions() as session:
            rows = await session.scalars(
                select(ModelRow)
                .where(
                    ModelRow.resource_id == resource_id,
                    ModelRow.name > after,
                    ModelRow.wrapped_data_key.is_not(None),
                )
                .order_by(ModelRow.name)
                .limit(limit)
            )
            return list(rows)

    async def delete_model(self, name: str) -> None:
        """Destroys the data key now; the blob and the row go by job."""
        obj = model_name(name)
        now = self.now()
        async with self._sessions.begin() as session:
            row = await session.get(ModelRow, obj.name, with_for_update=True)
            if row is None or row.wrapped_data_key is None:
                raise model_not_found(obj.name)
            jobs.add_job(session, jobs.REMOVE_BLOB, obj.resource_id, now, blob_key=row.blob_key)
            await session.delete(row)

    # -- analyze operations ----------------------------------------------------------------------

    def _expiry(self, row: AnalyzeOperationRow) -> datetime:
        return (row.complete_time or row.last_update_time) + self._retention

    async def create_operation(
        self, parent: str, model: str, result_id: str
    ) -> AnalyzeOperationRow:
        resource_id = parse_resource(parent, "parent")
        model_obj = model_name(model)
        if model_obj.resource_id != resource_id:
            raise InvalidArgument("INVALID_NAME", "model must belong to the parent resource")
        result_id = result_id or os.urandom(16).hex()
        obj = result_name(f"resources/{resource_id}/analyzeResults/{result_id}")
        await self.get_model(model_obj.name)
        now = self.now()
        row = AnalyzeOperationRow(
            name=obj.name,
            resource_id=resource_id,
            model=model_obj.name,
            status="not_started",
            create_time=now,
            last_update_time=now,
            expire_time=now + self._retention,
            error_message="",
            result_size_bytes=0,
            deleted=False,
        )
        async with self._sessions.begin() as session:
            existing = await session.get(AnalyzeOperationRow, obj.name)
            if existing is not None:
                raise AlreadyExists("ANALYZE_RESULT_ALREADY_EXISTS", f"{obj.name} already exists")
            session.add(row)
        return row

    async def _live_operation(
        self, session: AsyncSession, name: str, lock: bool
    ) -> AnalyzeOperationRow:
        obj = result_name(name)
        row = await session.get(AnalyzeOperationRow, obj.name, with_for_update=lock)
        # Expired results are gone for readers even before the sweeper runs.
        if row is None or row.deleted or row.expire_time <= self.now():
            raise analyze_result_not_found()
        return row

    async def get_operation(self, name: str) -> AnalyzeOperationRow:
        async with self._sessions() as session:
            return await self._live_operation(session, name, lock=False)

    async def update_operation(self, name: str, status: str, error: str) -> AnalyzeOperationRow:
        allowed = {
            "running": ("not_started",),
            "failed": ("not_started", "running"),
            "canceled": ("not_started", "running"),
        }
        if status not in allowed:
            raise InvalidArgument("INVALID_STATUS", "status must be RUNNING, FAILED or CANCELED")
        if len(error) > 1024:
            raise InvalidArgument("FIELD_TOO_LONG", "error_message is longer than 1024 characters")
        now = self.now()
        async with self._sessions.begin() as session:
            row = await self._live_operation(session, name, lock=True)
            if row.status not in allowed[status]:
                raise FailedPrecondition(
                    "INVALID_STATUS_TRANSITION",
                    f"{row.name} is {row.status}, cannot become {status}",
                )
            row.status, row.last_update_time = status, now
            if status in FINAL:
                row.complete_time = now
            row.error_message = error if status == "failed" else ""
            row.expire_time = self._expiry(row)
        return row

    async def put_result(
        self, name: str, chunks: AsyncIterable[bytes], caller: str
    ) -> AnalyzeOperationRow:
        obj = result_name(name)
        async with self._sessions() as session:
            before = await self._live_operation(session, obj.name, lock=False)
        if before.status in FINAL:
            raise FailedPrecondition("OPERATION_COMPLETE", f"{obj.name} is already {before.status}")
        stored = await self.write_encrypted(obj, chunks, caller)
        return await self.detached.run(self._commit_result(obj, stored))

    async def _commit_result(self, obj: ObjectName, stored: Stored) -> AnalyzeOperationRow:
        now = self.now()
        refusal: KeybrokerError | None = None
        async with self._sessions.begin() as session:
            row = await session.get(AnalyzeOperationRow, obj.name, with_for_update=True)
            if row is None or row.deleted or row.expire_time <= now:
                refusal = analyze_result_not_found()
            elif row.status in FINAL:
                refusal = FailedPrecondition("OPERATION_COMPLETE", f"{obj.name} is {row.status}")
            if refusal is not None or row is None:
                # Deleted, expired or completed meanwhile: the new blob is not wanted.
                jobs.add_job(
                    session, jobs.REMOVE_BLOB, obj.resource_id, now, blob_key=stored.blob_key
                )
            else:
                row.blob_key, row.wrapped_data_key = stored.blob_key, stored.wrapped
                row.key_id, row.result_size_bytes = stored.key_id, stored.size
                row.status, row.last_update_time, row.complete_time = "succeeded", now, now
                row.expire_time = self._expiry(row)
        if refusal is not None or row is None:
            raise refusal or analyze_result_not_found()
        return row

    async def read_result(self, row: AnalyzeOperationRow, caller: str) -> AsyncIterator[bytes]:
        if row.status != "succeeded" or row.wrapped_data_key is None or row.blob_key is None:
            raise FailedPrecondition("RESULT_NOT_READY", f"{row.name} is {row.status}")
        obj = result_name(row.name)
        return await self.open_decrypted(obj, row.blob_key, row.wrapped_data_key, caller)

    async def delete_result(self, name: str) -> None:
        """The seed's Delete Analyze Result: the data key dies now, the blob and row by job."""
        now = self.now()
        async with self._sessions.begin() as session:
            row = await self._live_operation(session, name, lock=True)
            await self._shred(session, row, now)

    async def _shred(self, session: AsyncSession, row: AnalyzeOperationRow, now: datetime) -> None:
        """Destroys the wrapped data key and queues the blob's removal (the row goes with it)."""
        row.deleted = True
        row.wrapped_data_key = None
        jobs.add_job(
            session,
            jobs.REMOVE_BLOB,
            row.resource_id,
            now,
            blob_key=row.blob_key or "",
            operation=row.name,
        )

    async def shred_expired(self, limit: int) -> int:
        """Retention: shreds up to `limit` expired operations in one transaction; returns the
        count."""
        now = self.now()
        async with self._sessions.begin() as session:
            rows = list(
                await session.scalars(
                    select(AnalyzeOperationRow)
                    .where(
                        AnalyzeOperationRow.expire_time <= now,
                        AnalyzeOperationRow.deleted.is_(False),
                    )
                    .order_by(AnalyzeOperationRow.expire_time)
                    .limit(limit)
                    .with_for_update()
                )
            )
            for row in rows:
                await self._shred(session, row, now)
            return len(rows)

    async def resource_ids(self) -> list[str]:
        """Every resource that has live objects here."""
        async with self._sessions() as session:
            models = await session.scalars(select(ModelRow.resource_id).distinct())
            results = await session.scalars(
                select(AnalyzeOperationRow.resource_id)
                .where(AnalyzeOperationRow.deleted.is_(False))
                .distinct()
            )
            return sorted(set(models) | set(results))

    async def purge_resource(self, resource_id: str) -> int:
        """Shreds every object of a destroyed resource (data keys now, blobs by job); returns
        how many."""
        now = self.now()
        async with self._sessions.begin() as session:
            models = list(
                await session.scalars(
                    select(ModelRow).where(ModelRow.resource_id == resource_id).with_for_update()
                )
            )
            for model in models:
                jobs.add_job(session, jobs.REMOVE_BLOB, resource_id, now, blob_key=model.blob_key)
                await session.delete(model)
            operations = list(
                await session.scalars(
                    select(AnalyzeOperationRow)
                    .where(
                        AnalyzeOperationRow.resource_id == resource_id,
                        AnalyzeOperationRow.deleted.is_(False),
                    )
                    .with_for_update()
                )
            )
            for operation in operations:
                await self._shred(session, operation, now)
        return len(models) + len(operations)

    async def remove_blob(self, blob_key: str, operation: str | None) -> None:
        """The remove-blob job: the blob, then the shredded operation's row. Idempotent."""
        if blob_key:
            await self.blobs.delete(blob_key)
        if operation:
            async with self._sessions.begin() as session:
                row = await session.get(AnalyzeOperationRow, operation, with_for_update=True)
                if row is not None and row.deleted:
                    await session.delete(row)

    async def swap_object(self, name: str, old_blob: str, stored: Stored) -> bool:
        """Points an object at a re-encrypted copy, if it still has the blob the copy was made
        from; the old blob goes by job. Returns False (and drops the copy) when it changed."""
        obj = parse_object(name)
        table = ModelRow if obj.purpose is Purpose.MODELS else AnalyzeOperationRow
        now = self.now()
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(table)
                .where(
                    table.name == name,
                    table.blob_key == old_blob,
                    table.wrapped_data_key.is_not(None),
                )
                .values(
                    blob_key=stored.blob_key, wrapped_data_key=stored.wrapped, key_id=stored.key_id
                )
                .execution_options(synchronize_session=False)
            )
            swapped = bool(result.rowcount)  # type: ignore[attr-defined]
            dropped = old_blob if swapped else stored.blob_key
            jobs.add_job(session, jobs.REMOVE_BLOB, obj.resource_id, now, blob_key=dropped)
        return swapped
