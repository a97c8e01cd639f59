"""The Storage gRPC service: request checks and the mapping to keybroker.v1 messages over
workers.objects (stored objects) and workers.jobs (long jobs)."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from datetime import datetime
from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.api import storage_pb2 as spb
from broker.api import storage_pb2_grpc as spb_grpc
from broker.core.errors import InvalidArgument, NotFound
from broker.core.identity import call_identity
from broker.core.names import parse_resource, resource_name
from broker.rpc import fields
from broker.rpc.authz import check_name, check_resource
from broker.rpc.stream_limits import StreamLimiter
from workers import jobs
from workers.jobs import JobQueue
from workers.objects import ObjectStore
from workers.tables import AnalyzeOperationRow, JobRow, ModelRow

Context = grpc.aio.ServicerContext[Any, Any]
_STATUS = {
    "not_started": spb.AnalyzeOperation.NOT_STARTED,
    "running": spb.AnalyzeOperation.RUNNING,
    "succeeded": spb.AnalyzeOperation.SUCCEEDED,
    "failed": spb.AnalyzeOperation.FAILED,
    "canceled": spb.AnalyzeOperation.CANCELED,
}
_STATUS_IN = {v: k for k, v in _STATUS.items()}
_JOB_STATE = {
    "pending": spb.Job.PENDING,
    "running": spb.Job.RUNNING,
    "succeeded": spb.Job.SUCCEEDED,
    "failed": spb.Job.FAILED,
}


def model_message(row: ModelRow) -> spb.Model:
    return spb.Model(
        name=row.name,
        size_bytes=row.size_bytes,
        create_time=fields.timestamp(row.create_time),
        key_id=row.key_id,
    )


def operation_message(row: AnalyzeOperationRow) -> spb.AnalyzeOperation:
    message = spb.AnalyzeOperation(
        name=row.name,
        model=row.model,
        status=_STATUS[row.status],
        create_time=fields.timestamp(row.create_time),
        last_update_time=fields.timestamp(row.last_update_time),
        expire_time=fields.timestamp(row.expire_time),
        result_size_bytes=row.result_size_bytes,
        error_message=row.error_message,
    )
    if row.complete_time is not None:
        message.complete_time.CopyFrom(fields.timestamp(row.complete_time))
    return message


def job_message(row: JobRow) -> spb.Job:
    return spb.Job(
        name=f"jobs/{row.id}",
        kind=row.kind,
        resource=resource_name(row.resource_id),
        state=_JOB_STATE[row.state],
        done=row.done,
        total=row.total,
        create_time=fields.timestamp(row.create_time),
        update_time=fields.timestamp(row.update_time),
        error_message=row.error_message,
    )


async def _header_then_chunks(
    requests: AsyncIterable[Any],
) -> tuple[str, AsyncIterator[bytes]]:
    """Splits an upload stream into the header's name and the chunks that follow it."""
    iterator = aiter(requests)
    first = await anext(iterator, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("MISSING_FIELD", "the first message must carry the header")
    # The name arrives only now: the caller's grant is checked here (broker.rpc.authz, deferred).
    check_name(first.header.name)

    async def chunks() -> AsyncIterator[bytes]:
        async for message in iterator:
            if message.WhichOneof("part") == "header":
                raise InvalidArgument(
                    "UNEXPECTED_HEADER", "only the first message carries a header"
                )
            yield message.chunk

    return first.header.name, chunks()


class StorageService(spb_grpc.StorageServicer):
    """keybroker.v1.Storage."""

    def __init__(
        self,
        objects: ObjectStore,
        queue: JobQueue,
        sessions: async_sessionmaker[AsyncSession],
        now: Callable[[], datetime],
    ) -> None:
        self._objects = objects
        self._queue = queue
        # Handlers' database work runs detached: a cancelled RPC must not cut a transaction
        # short (see broker.core.detached); shutdown waits for it.
        self._detached = objects.detached
        self._sessions = sessions
        self._now = now
        # Uploads and downloads hold memory, a file and a thread hop each: bounded per caller.
        self._streams = StreamLimiter()

    # -- models ----------------------------------------------------------------------------------

    async def UploadModel(
        self, request_iterator: AsyncIterable[spb.UploadModelRequest], context: Context
    ) -> spb.UploadModelResponse:
        caller = call_identity(context)[0]
        with self._streams.hold(caller):
            name, chunks = await _header_then_chunks(request_iterator)
            row = await self._objects.put_model(name, chunks, caller)
        return spb.UploadModelResponse(model=model_message(row))

    async def DownloadModel(
        self, request: spb.DownloadModelRequest, context: Context
    ) -> AsyncIterator[spb.DownloadModelResponse]:
        caller = call_identity(context)[0]
        with self._streams.hold(caller):
            row = await self._detached.run(self._objects.get_model(request.name))
            plaintext = await self._objects.read_model(row, caller)
            yield spb.DownloadModelResponse(model=model_message(row))
            async for chunk in plaintext:
                yield spb.DownloadModelResponse(chunk=chunk)

    async def GetModel(
        self, request: spb.GetModelRequest, context: Context
    ) -> spb.GetModelResponse:
        return spb.GetModelResponse(
            model=model_message(await self._objects.get_model(request.name))
        )

    async def ListModels(
        self, request: spb.ListModelsRequest, context: Context
    ) -> spb.ListModelsResponse:
        resource_id = parse_resource(request.parent, "parent")
        size = fields.page_size(request.page_size)
        after = fields.decode_page_token("m", request.page_token) or ""
        rows = await self._detached.run(self._objects.list_models(resource_id, after, size + 1))
        response = spb.ListModelsResponse(models=[model_message(r) for r in rows[:size]])
        if len(rows) > size:
            response.next_page_token = fields.encode_page_token("m", rows[size - 1].name)
        return response

    async def DeleteModel(
        self, request: spb.DeleteModelRequest, context: Context
    ) -> spb.DeleteModelResponse:
        await self._detached.run(self._objects.delete_model(request.name))
        return spb.DeleteModelResponse()

    # -- analyze operations ----------------------------------------------------------------------

    async def CreateAnalyzeOperation(
        self, request: spb.CreateAnalyzeOperationRequest, context: Context
    ) -> spb.CreateAnalyzeOperationResponse:
        row = await self._detached.run(
            self._objects.create_operation(request.parent, request.model, request.analyze_result_id)
        )
        return spb.CreateAnalyzeOperationResponse(operation=operation_message(row))

    async def UpdateAnalyzeOperation(
        self, request: spb.UpdateAnalyzeOperationRequest, context: Context
    ) -> spb.UpdateAnalyzeOperationResponse:
        status = _STATUS_IN.get(request.status, "")
        row = await self._detached.run(
            self._objects.update_operation(request.name, status, request.error_message)
        )
        return spb.UpdateAnalyzeOperationResponse(operation=operation_message(row))

    async def UploadAnalyzeResult(
        self, request_iterator: AsyncIterable[spb.UploadAnalyzeResultRequest], context: Context
    ) -> spb.UploadAnalyzeResultResponse:
        caller = call_identity(context)[0]
        with self._streams.hold(caller):
            name, chunks = await _header_then_chunks(request_iterator)
            row = await self._objects.put_result(name, chunks, caller)
        return spb.UploadAnalyzeResultResponse(operation=operation_message(row))

    async def GetAnalyzeOperation(
        self, request: spb.GetAnalyzeOperationRequest, context: Context
    ) -> spb.GetAnalyzeOperationResponse:
        row = await self._detached.run(self._objects.get_operation(request.name))
        return spb.GetAnalyzeOperationResponse(operation=operation_message(row))

    async def DownloadAnalyzeResult(
        self, request: spb.DownloadAnalyzeResultRequest, context: Context
    ) -> AsyncIterator[spb.DownloadAnalyzeResultResponse]:
        caller = call_identity(context)[0]
        with self._streams.hold(caller):
            row = await self._detached.run(self._objects.get_operation(request.name))
            plaintext = await self._objects.read_result(row, caller)
            yield spb.DownloadAnalyzeResultResponse(operation=operation_message(row))
            async for chunk in plaintext:
                yield spb.DownloadAnalyzeResultResponse(chunk=chunk)

    async def DeleteAnalyzeResult(
        self, request: spb.DeleteAnalyzeResultRequest, context: Context
    ) -> spb.DeleteAnalyzeResultResponse:
        await self._detached.run(self._objects.delete_result(request.name))
        return spb.DeleteAnalyzeResultResponse()

    # -- jobs ------------------------------------------------------------------------------------

    async def _start(self, kind: str, name: str) -> spb.Job:
        resource_id = parse_resource(name)

        async def add() -> JobRow:
            async with self._sessions.begin() as session:
                return jobs.add_job(session, kind, resource_id, self._now())

        return job_message(await self._detached.run(add()))

    async def StartRewrapJob(
        self, request: spb.StartRewrapJobRequest, context: Context
    ) -> spb.StartRewrapJobResponse:
        return spb.StartRewrapJobResponse(job=await self._start(jobs.REWRAP, request.name))

    async def StartReencryptJob(
        self, request: spb.StartReencryptJobRequest, context: Context
    ) -> spb.StartReencryptJobResponse:
        return spb.StartReencryptJobResponse(job=await self._start(jobs.REENCRYPT, request.name))

    async def GetJob(self, request: spb.GetJobRequest, context: Context) -> spb.GetJobResponse:
        job_id = request.name.removeprefix("jobs/")
        if not request.name.startswith("jobs/") or not job_id.isalnum() or len(job_id) > 32:
            raise InvalidArgument("INVALID_NAME", "name must be jobs/{job}")
        row = await self._detached.run(self._queue.get(job_id))
        if row is None:
            raise NotFound("JOB_NOT_FOUND", f"{request.name} does not exist")
        check_resource(row.resource_id)  # a job's name does not say its resource (broker.rpc.authz)
        return spb.GetJobResponse(job=job_message(row))


def add_to_server(service: StorageService, server: grpc.aio.Server) -> None:
    spb_grpc.add_StorageServicer_to_server(service, server)
