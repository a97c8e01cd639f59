"""The Storage service through a real server (keybroker up's shape: broker and workers on one
port, Storage calling the broker through the stubs): models and analyze results stored
encrypted, read back, expired, deleted, and damaged."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import text

from broker.api import key_broker_pb2 as pb
from broker.api import storage_pb2 as spb
from broker.core.settings import Settings
from tests.harness import BrokerUnderTest, assert_error, running_broker
from workers.retention import sweep

SEGMENT = 4096
MODEL = "resources/r1/models/m1"


@pytest.fixture
def storage_settings(settings: Settings) -> Settings:
    return replace(
        settings,
        segment_size=SEGMENT,
        job_poll_interval=timedelta(milliseconds=50),
        dev_vault=True,
    )


@pytest_asyncio.fixture
async def kb(storage_settings: Settings) -> AsyncIterator[BrokerUnderTest]:
    async with running_broker(storage_settings, with_storage=True) as b:
        await b.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
        yield b


def upload_requests(name: str, data: bytes, chunk: int = 1000) -> Any:
    async def gen() -> AsyncIterator[spb.UploadModelRequest]:
        yield spb.UploadModelRequest(header=spb.UploadModelRequest.Header(name=name))
        for i in range(0, len(data), chunk):
            yield spb.UploadModelRequest(chunk=data[i : i + chunk])

    return gen()


def result_requests(name: str, data: bytes, chunk: int = 1000) -> Any:
    async def gen() -> AsyncIterator[spb.UploadAnalyzeResultRequest]:
        yield spb.UploadAnalyzeResultRequest(
            header=spb.UploadAnalyzeResultRequest.Header(name=name)
        )
        for i in range(0, len(data), chunk):
            yield spb.UploadAnalyzeResultRequest(chunk=data[i : i + chunk])

    return gen()


async def upload(kb: BrokerUnderTest, name: str, data: bytes) -> spb.Model:
    reply: spb.UploadModelResponse = await kb.storage.UploadModel(upload_requests(name, data))
    return reply.model


async def download(kb: BrokerUnderTest, name: str) -> bytes:
    parts: list[bytes] = []
    async for message in kb.storage.DownloadModel(spb.DownloadModelRequest(name=name)):
        if message.WhichOneof("part") == "chunk":
            parts.append(message.chunk)
    return b"".join(parts)


async def model_row(kb: BrokerUnderTest, name: str) -> Sequence[Any]:
    async with kb.engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT blob_key, wrapped_data_key, key_id FROM models WHERE name = :n"),
                {"n": name},
            )
        ).one()
        return tuple(row)


async def wait_jobs_done(kb: BrokerUnderTest) -> None:
    for _ in range(200):
        async with kb.engine.connect() as conn:
            pending = (
                await conn.execute(
                    text("SELECT count(*) FROM jobs WHERE state IN ('pending', 'running')")
                )
            ).scalar_one()
        if pending == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("jobs did not finish")


@pytest.mark.asyncio
async def test_models_round_trip_encrypted_at_rest(
    kb: BrokerUnderTest, storage_settings: Settings
) -> None:
    data = os.urandom(SEGMENT * 3 + 1234)  # more than three segments
    model = await upload(kb, MODEL, data)
    assert model.size_bytes == len(data)
    assert model.key_id == "resources/r1/resourceKeys/models/versions/1"
    assert await download(kb, MODEL) == data

    empty = await upload(kb, "resources/r1/models/empty", b"")
    assert empty.size_bytes == 0
    assert await download(kb, "resources/r1/models/empty") == b""

    blob_key, wrapped, _ = await model_row(kb, MODEL)
    blob = (storage_settings.blob_dir / blob_key).read_bytes()
    assert data[:64] not in blob
    assert len(blob) > len(data)
    assert len(wrapped) == 65

    listed = await kb.storage.ListModels(spb.ListModelsRequest(parent="resources/r1", page_size=1))
    assert [m.name for m in listed.models] == ["resources/r1/models/empty"]
    rest = await kb.storage.ListModels(
        spb.ListModelsRequest(parent="resources/r1", page_token=listed.next_page_token)
    )
    assert [m.name for m in rest.models] == [MODEL]


@pytest.mark.asyncio
async def test_replacing_and_deleting_a_model(
    kb: BrokerUnderTest, storage_settings: Settings
) -> None:
    await upload(kb, MODEL, b"first version")
    old_blob, _, _ = await model_row(kb, MODEL)
    await upload(kb, MODEL, b"second version")
    assert await download(kb, MODEL) == b"second version"
    await wait_jobs_done(kb)
    assert not (storage_settings.blob_dir / old_blob).exists()

    new_blob, _, _ = await model_row(kb, MODEL)
    await kb.storage.DeleteModel(spb.DeleteModelRequest(name=MODEL))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.storage.GetModel(spb.GetModelRequest(name=MODEL))
    assert_error(err.value, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    await wait_jobs_done(kb)
    assert not (storage_settings.blob_dir / new_blob).exists()


@pytest.mark.asyncio
async def test_a_tampered_blob_sends_only_authenticated_segments(
    kb: BrokerUnderTest, storage_settings: Settings
) -> None:
    data = os.urandom(SEGMENT * 4)
    await upload(kb, MODEL, data)
    blob_key, _, _ = await model_row(kb, MODEL)
    path = storage_settings.blob_dir / blob_key
    blob = bytearray(path.read_bytes())
    blob[SEGMENT * 2 + 100] ^= 0x01  # inside the third ciphertext segment
    path.write_bytes(bytes(blob))

    received: list[bytes] = []

    async def read_all() -> None:
        async for message in kb.storage.DownloadModel(spb.DownloadModelRequest(name=MODEL)):
            if message.WhichOneof("part") == "chunk":
                received.append(message.chunk)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read_all()
    assert_error(err.value, grpc.StatusCode.DATA_LOSS, "STORED_OBJECT_CORRUPT")
    got = b"".join(received)
    # Only the first two segments' plaintext, which authenticated, was sent.
    first = SEGMENT - 56
    assert got == data[: first + (SEGMENT - 16)]


@pytest.mark.asyncio
async def test_another_resources_object_does_not_open(kb: BrokerUnderTest) -> None:
    await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id="r2"))
    await upload(kb, MODEL, b"r1's model")
    await upload(kb, "resources/r2/models/m1", b"r2's model")
    async with kb.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE models SET (blob_key, wrapped_data_key) ="
                " (SELECT blob_key, wrapped_data_key FROM models"
                " WHERE name = 'resources/r2/models/m1') WHERE name = :n"
            ),
            {"n": MODEL},
        )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await download(kb, MODEL)
    assert_error(err.value, grpc.StatusCode.DATA_LOSS, "STORED_OBJECT_CORRUPT")


async def analyze(kb: BrokerUnderTest, result_id: str, data: bytes) -> spb.AnalyzeOperation:
    await upload(kb, MODEL, b"model")
    created = await kb.storage.CreateAnalyzeOperation(
        spb.CreateAnalyzeOperationRequest(
            parent="resources/r1", model=MODEL, analyze_result_id=result_id
        )
    )
    assert created.operation.status == spb.AnalyzeOperation.NOT_STARTED
    name = created.operation.name
    running = await kb.storage.UpdateAnalyzeOperation(
        spb.UpdateAnalyzeOperationRequest(name=name, status=spb.AnalyzeOperation.RUNNING)
    )
    assert running.operation.status == spb.AnalyzeOperation.RUNNING
    done: spb.UploadAnalyzeResultResponse = await kb.storage.UploadAnalyzeResult(
        result_requests(name, data)
    )
    return done.operation


async def download_result(kb: BrokerUnderTest, name: str) -> bytes:
    parts = []
    async for message in kb.storage.DownloadAnalyzeResult(
        spb.DownloadAnalyzeResultRequest(name=name)
    ):
        if message.WhichOneof("part") == "chunk":
            parts.append(message.chunk)
    return b"".join(parts)


@pytest.mark.asyncio
async def test_analyze_results_expire_24_hours_after_completion(
    kb: BrokerUnderTest, storage_settings: Settings
) -> None:
    data = os.urandom(10_000)
    op = await analyze(kb, "a1", data)
    assert op.status == spb.AnalyzeOperation.SUCCEEDED
    window = op.expire_time.ToDatetime() - op.complete_time.ToDatetime()
    assert window == timedelta(hours=24)
    assert await download_result(kb, op.name) == data
    async with kb.engine.connect() as conn:
        blob_key = (
            await conn.execute(
                text("SELECT blob_key FROM analyze_operations WHERE name = :n"), {"n": op.name}
            )
        ).scalar_one()
    assert (storage_settings.blob_dir / blob_key).exists()

    kb.clock.advance(timedelta(hours=24, seconds=1))
    # Expired: NOT_FOUND at once, before any sweep.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.storage.GetAnalyzeOperation(spb.GetAnalyzeOperationRequest(name=op.name))
    assert_error(err.value, grpc.StatusCode.NOT_FOUND, "ANALYZE_RESULT_NOT_FOUND")
    assert err.value.details() == "analyze result does not exist"

    storage = kb.workers
    counts = await sweep(
        storage.objects, storage.objects.blobs, storage.context.sessions, storage.audit
    )
    assert counts.shredded == 1
    again = await sweep(
        storage.objects, storage.objects.blobs, storage.context.sessions, storage.audit
    )
    assert again.shredded == 0  # idempotent
    await wait_jobs_done(kb)
    async with kb.engine.connect() as conn:
        left = (await conn.execute(text("SELECT count(*) FROM analyze_operations"))).scalar_one()
    assert left == 0
    assert not any(
        p.is_file()
        for p in storage_settings.blob_dir.rglob("*")
        if "r1" in str(p) and p.stat().st_size > 9000
    )


@pytest.mark.asyncio
async def test_operations_that_never_complete_expire_after_their_last_update(
    kb: BrokerUnderTest,
) -> None:
    await upload(kb, MODEL, b"model")
    created = await kb.storage.CreateAnalyzeOperation(
        spb.CreateAnalyzeOperationRequest(parent="resources/r1", model=MODEL)
    )
    kb.clock.advance(timedelta(hours=23))
    await kb.storage.UpdateAnalyzeOperation(
        spb.UpdateAnalyzeOperationRequest(
            name=created.operation.name, status=spb.AnalyzeOperation.RUNNING
        )
    )
    kb.clock.advance(timedelta(hours=23))
    got = await kb.storage.GetAnalyzeOperation(
        spb.GetAnalyzeOperationRequest(name=created.operation.name)
    )
    assert got.operation.status == spb.AnalyzeOperation.RUNNING
    kb.clock.advance(timedelta(hours=1, seconds=1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.storage.GetAnalyzeOperation(
            spb.GetAnalyzeOperationRequest(name=created.operation.name)
        )
    assert_error(err.value, grpc.StatusCode.NOT_FOUND, "ANALYZE_RESULT_NOT_FOUND")


@pytest.mark.asyncio
async def test_delete_analyze_result_succeeds_once_then_not_found(kb: BrokerUnderTest) -> None:
    op = await analyze(kb, "a1", b"result bytes")
    await kb.storage.DeleteAnalyzeResult(spb.DeleteAnalyzeResultRequest(name=op.name))
    async with kb.engine.connect() as conn:
        wrapped = (
            await conn.execute(
                text("SELECT wrapped_data_key FROM analyze_operations WHERE name = :n"),
                {"n": op.name},
            )
        ).scalar_one_or_none()
    assert wrapped is None  # the data key is gone from the first call on
    for name in (op.name, "resources/r1/analyzeResults/never-was"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await kb.storage.DeleteAnalyzeResult(spb.DeleteAnalyzeResultRequest(name=name))
        assert_error(err.value, grpc.StatusCode.NOT_FOUND, "ANALYZE_RESULT_NOT_FOUND")
        assert err.value.details() == "analyze result does not exist"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await download_result(kb, op.name)
    assert_error(err.value, grpc.StatusCode.NOT_FOUND, "ANALYZE_RESULT_NOT_FOUND")


@pytest.mark.asyncio
async def test_deletes_work_while_the_customer_key_is_revoked(
    kb: BrokerUnderTest, storage_settings: Settings
) -> None:
    from broker.providers.dev_vault import FILE_NAME, DevVaultStore

    store = DevVaultStore(storage_settings.data_dir / FILE_NAME)
    version = store.create_key("k1", "AES", 256).version
    await kb.stub.EnableCustomerManagedKey(
        pb.EnableCustomerManagedKeyRequest(
            name="resources/r1",
            key=pb.CustomerKeyReference(
                provider="dev-vault", vault="dev", key_name="k1", version=version
            ),
        )
    )
    op = await analyze(kb, "a1", b"result")
    store.set_enabled("k1", "", False)
    kb.running.broker.keys.cache.clear()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await download_result(kb, op.name)
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_KEY_UNAVAILABLE")
    await kb.storage.DeleteAnalyzeResult(spb.DeleteAnalyzeResultRequest(name=op.name))
    await kb.storage.DeleteModel(spb.DeleteModelRequest(name=MODEL))


@pytest.mark.asyncio
async def test_rewrap_job_moves_every_data_key_then_schedules_old_versions(
    kb: BrokerUnderTest,
) -> None:
    data = {f"resources/r1/models/m{i}": os.urandom(100 + i) for i in range(5)}
    for name, blob in data.items():
        await upload(kb, name, blob)
    await kb.stub.RotateResourceKey(
        pb.RotateResourceKeyRequest(name="resources/r1/resourceKeys/models")
    )
    started = await kb.storage.StartRewrapJob(spb.StartRewrapJobRequest(name="resources/r1"))
    for _ in range(200):
        job = (await kb.storage.GetJob(spb.GetJobRequest(name=started.job.name))).job
        if job.state in (spb.Job.SUCCEEDED, spb.Job.FAILED):
            break
        await asyncio.sleep(0.05)
    assert job.state == spb.Job.SUCCEEDED
    assert (job.done, job.total) == (5, 5)
    for name, blob in data.items():
        _, _, key_id = await model_row(kb, name)
        assert key_id == "resources/r1/resourceKeys/models/versions/2"
        assert await download(kb, name) == blob
    versions = await kb.stub.ListResourceKeyVersions(
        pb.ListResourceKeyVersionsRequest(parent="resources/r1/resourceKeys/models")
    )
    states = {v.version: v.state for v in versions.resource_key_versions}
    assert states == {2: pb.ResourceKeyVersion.ENABLED, 1: pb.ResourceKeyVersion.DESTROY_SCHEDULED}


@pytest.mark.asyncio
async def test_reencrypt_job_gives_every_object_a_fresh_data_key(kb: BrokerUnderTest) -> None:
    data = os.urandom(SEGMENT * 2)
    await upload(kb, MODEL, data)
    before = await model_row(kb, MODEL)
    started = await kb.storage.StartReencryptJob(spb.StartReencryptJobRequest(name="resources/r1"))
    for _ in range(200):
        job = (await kb.storage.GetJob(spb.GetJobRequest(name=started.job.name))).job
        if job.state in (spb.Job.SUCCEEDED, spb.Job.FAILED):
            break
        await asyncio.sleep(0.05)
    assert job.state == spb.Job.SUCCEEDED
    after = await model_row(kb, MODEL)
    assert after[0] != before[0]
    assert after[1] != before[1]
    assert await download(kb, MODEL) == data


@pytest.mark.asyncio
async def test_objects_of_a_deleted_resource_are_unreadable_then_purged_when_destroyed(
    kb: BrokerUnderTest, storage_settings: Settings
) -> None:
    op = await analyze(kb, "a1", b"result bytes")  # uploads MODEL too
    blob_key, _, _ = await model_row(kb, MODEL)
    await kb.stub.DeleteResource(pb.DeleteResourceRequest(name="resources/r1"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await download(kb, MODEL)
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "RESOURCE_DELETE_SCHEDULED")

    storage = kb.workers
    args = (storage.objects, storage.objects.blobs, storage.context.sessions, storage.audit)
    assert (await sweep(*args)).purged == 0  # not destroyed yet: nothing purged
    await kb.stub.UndeleteResource(pb.UndeleteResourceRequest(name="resources/r1"))
    assert await download(kb, MODEL) == b"model"

    zero = Duration()
    zero.FromTimedelta(timedelta(0))
    await kb.stub.DeleteResource(pb.DeleteResourceRequest(name="resources/r1", pending_window=zero))
    assert (await sweep(*args)).purged == 2
    await wait_jobs_done(kb)
    assert not (storage_settings.blob_dir / blob_key).exists()
    async with kb.engine.connect() as conn:
        for table in ("models", "analyze_operations"):
            left = (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
            assert left == 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.storage.GetAnalyzeOperation(spb.GetAnalyzeOperationRequest(name=op.name))
    assert_error(err.value, grpc.StatusCode.NOT_FOUND, "ANALYZE_RESULT_NOT_FOUND")
    assert (await sweep(*args)).purged == 0  # idempotent


@pytest.mark.asyncio
async def test_bad_storage_requests_get_precise_errors_and_change_nothing(
    kb: BrokerUnderTest,
) -> None:
    await upload(kb, MODEL, b"model")

    async def snapshot() -> list[Any]:
        async with kb.engine.connect() as conn:
            out: list[Any] = []
            for table in ("models", "analyze_operations", "jobs"):
                rows = await conn.execute(text(f"SELECT * FROM {table}"))
                out.append(sorted(repr(tuple(r)) for r in rows))
            return out

    before = await snapshot()

    async def no_header() -> AsyncIterator[spb.UploadModelRequest]:
        yield spb.UploadModelRequest(chunk=b"bytes before any header")

    async def two_headers() -> AsyncIterator[spb.UploadModelRequest]:
        header = spb.UploadModelRequest.Header(name="resources/r1/models/m2")
        yield spb.UploadModelRequest(header=header)
        yield spb.UploadModelRequest(header=header)

    cases: list[tuple[Any, grpc.StatusCode, str]] = [
        (
            lambda: kb.storage.UploadModel(no_header()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "MISSING_FIELD",
        ),
        (
            lambda: kb.storage.UploadModel(two_headers()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNEXPECTED_HEADER",
        ),
        (
            lambda: kb.storage.UploadModel(upload_requests("resources/r1/analyzeResults/x", b"x")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_NAME",
        ),
        (
            lambda: kb.storage.UploadModel(upload_requests("resources/nope/models/m", b"x")),
            grpc.StatusCode.NOT_FOUND,
            "RESOURCE_NOT_FOUND",
        ),
        (
            lambda: kb.storage.GetModel(spb.GetModelRequest(name="resources/r1/models/missing")),
            grpc.StatusCode.NOT_FOUND,
            "MODEL_NOT_FOUND",
        ),
        (
            lambda: kb.storage.GetModel(spb.GetModelRequest(name="../etc/passwd")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_NAME",
        ),
        (
            lambda: kb.storage.ListModels(
                spb.ListModelsRequest(parent="resources/r1", page_token="zz")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
        ),
        (
            lambda: kb.storage.CreateAnalyzeOperation(
                spb.CreateAnalyzeOperationRequest(parent="resources/r2", model=MODEL)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_NAME",
        ),
        (
            lambda: kb.storage.CreateAnalyzeOperation(
                spb.CreateAnalyzeOperationRequest(
                    parent="resources/r1", model="resources/r1/models/missing"
                )
            ),
            grpc.StatusCode.NOT_FOUND,
            "MODEL_NOT_FOUND",
        ),
        (
            lambda: kb.storage.UpdateAnalyzeOperation(
                spb.UpdateAnalyzeOperationRequest(
                    name="resources/r1/analyzeResults/none", status=spb.AnalyzeOperation.RUNNING
                )
            ),
            grpc.StatusCode.NOT_FOUND,
            "ANALYZE_RESULT_NOT_FOUND",
        ),
        (
            lambda: kb.storage.GetJob(spb.GetJobRequest(name="jobs/../../x")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_NAME",
        ),
        (
            lambda: kb.storage.GetJob(spb.GetJobRequest(name="jobs/abc123")),
            grpc.StatusCode.NOT_FOUND,
            "JOB_NOT_FOUND",
        ),
    ]
    for call, code, reason in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call()
        assert_error(err.value, code, reason)
    assert await snapshot() == before

    created = await kb.storage.CreateAnalyzeOperation(
        spb.CreateAnalyzeOperationRequest(parent="resources/r1", model=MODEL)
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.storage.UpdateAnalyzeOperation(
            spb.UpdateAnalyzeOperationRequest(
                name=created.operation.name, status=spb.AnalyzeOperation.SUCCEEDED
            )
        )
    assert_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_STATUS")
    await kb.storage.UpdateAnalyzeOperation(
        spb.UpdateAnalyzeOperationRequest(
            name=created.operation.name, status=spb.AnalyzeOperation.CANCELED
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.storage.UploadAnalyzeResult(result_requests(created.operation.name, b"late"))
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "OPERATION_COMPLETE")
