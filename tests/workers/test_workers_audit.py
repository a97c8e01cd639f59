"""The workers' own audit records (retention sweeps, purges, refused Storage calls) join the
broker's HMAC chain: a standalone `keybroker workers` process, which holds no master key, sends
them to the broker (KeyBroker.WriteAuditRecord) over mutual TLS, and `audit verify` then finds
every record chained, with the workers' certificate identity as the caller. Also: what
WriteAuditRecord refuses (unknown operations, malformed fields, non-admin callers), and that
`keybroker up` chains the sweeper's records in process."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from broker.api import key_broker_pb2 as pb
from broker.api import key_broker_pb2_grpc as pb_grpc
from broker.api import storage_pb2 as spb
from broker.api import storage_pb2_grpc as spb_grpc
from broker.audit import verify
from broker.cli import dev_certs
from broker.core.identity import REQUEST_ID_KEY
from broker.core.settings import Settings
from broker.service.key_broker import WORKER_OPERATIONS
from tests.harness import (
    BrokerUnderTest,
    Clock,
    assert_error,
    audit_rows,
    client_credentials,
    mtls_settings,
    open_channel,
    running_broker,
    state_digest,
)
from workers import retention
from workers.server import RunningWorkers, serve_workers

CLIENTS = ("admin", "workers", "app", "auditor")
SPIFFE_WORKERS = dev_certs.spiffe_id("workers")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A development CA, certificates and policy (DEV_ROLES: workers hold admin + data-plane)."""
    directory = tmp_path_factory.mktemp("pki") / "certs"
    dev_certs.init_dev_certs(directory, CLIENTS)
    return directory


def tls_settings(settings: Settings, pki: Path) -> Settings:
    return mtls_settings(
        settings,
        pki,
        segment_size=4096,
        job_poll_interval=timedelta(milliseconds=50),
        # The background sweeper sweeps once at start (nothing expired yet), then waits: the
        # test runs the sweeps it checks itself, on the workers' own Storage.
        sweep_interval=timedelta(hours=1),
    )


@asynccontextmanager
async def standalone_workers(settings: Settings, clock: Clock) -> AsyncIterator[RunningWorkers]:
    """`keybroker workers` (serve_workers) in a task of its own, until exit."""
    stop = anyio.Event()
    started: asyncio.Future[RunningWorkers] = asyncio.get_running_loop().create_future()

    async def supervise() -> None:
        async with anyio.create_task_group() as tg:
            started.set_result(
                await tg.start(partial(serve_workers, settings, stop, now=clock.now))
            )

    task = asyncio.create_task(supervise())
    waiters: set[asyncio.Future[Any]] = {task, started}
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        task.result()  # raises serve_workers' failure
        raise AssertionError("serve_workers returned without starting")
    try:
        yield started.result()
    finally:
        stop.set()
        await task


def upload_model(name: str, data: bytes) -> Any:
    async def gen() -> AsyncIterator[spb.UploadModelRequest]:
        yield spb.UploadModelRequest(header=spb.UploadModelRequest.Header(name=name))
        yield spb.UploadModelRequest(chunk=data)

    return gen()


def upload_result(name: str, data: bytes) -> Any:
    async def gen() -> AsyncIterator[spb.UploadAnalyzeResultRequest]:
        header = spb.UploadAnalyzeResultRequest.Header(name=name)
        yield spb.UploadAnalyzeResultRequest(header=header)
        yield spb.UploadAnalyzeResultRequest(chunk=data)

    return gen()


async def store_result(storage: Any, resource: str, result_id: str) -> None:
    """A model and a completed analyze result of it, through Storage."""
    model = f"resources/{resource}/models/m1"
    await storage.UploadModel(upload_model(model, b"model bytes " * 100))
    created = await storage.CreateAnalyzeOperation(
        spb.CreateAnalyzeOperationRequest(
            parent=f"resources/{resource}", model=model, analyze_result_id=result_id
        )
    )
    await storage.UploadAnalyzeResult(upload_result(created.operation.name, b"result " * 300))


async def run_verify(settings: Settings) -> tuple[int, str]:
    out = io.StringIO()
    code = await verify.run(settings, out)
    return code, out.getvalue()


def only(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


@pytest.mark.asyncio
async def test_standalone_workers_records_are_chained_by_the_broker(
    settings: Settings, pki: Path
) -> None:
    tls = tls_settings(settings, pki)
    clock = Clock()
    async with running_broker(tls, clock, credentials=client_credentials(pki, "admin")) as b:
        for r in ("r1", "r2"):
            await b.stub.CreateResource(pb.CreateResourceRequest(resource_id=r))
        workers_settings = replace(tls, broker_address=f"127.0.0.1:{b.running.port}")
        async with standalone_workers(workers_settings, clock) as workers:
            async with (
                open_channel(workers.port, client_credentials(pki, "app")) as app,
                open_channel(workers.port, client_credentials(pki, "auditor")) as auditor,
            ):
                storage = spb_grpc.StorageStub(app)
                await store_result(storage, "r1", "a1")
                await storage.UploadModel(upload_model("resources/r2/models/m1", b"model"))
                # A Storage call the workers' authorization refuses (auditors hold no
                # data-plane role), with a request id of the caller's own.
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await spb_grpc.StorageStub(auditor).GetModel(
                        spb.GetModelRequest(name="resources/r1/models/m1"),
                        metadata=((REQUEST_ID_KEY, "refused-call-1"),),
                    )
                assert_error(err.value, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")

            # r1's result expires; r2 (one model) is destroyed at once: one sweep does both.
            clock.advance(timedelta(hours=24, seconds=1))
            zero = Duration()
            zero.FromTimedelta(timedelta(0))
            await b.stub.DeleteResource(
                pb.DeleteResourceRequest(name="resources/r2", pending_window=zero)
            )
            s = workers.storage
            counts = await retention.sweep(s.objects, s.objects.blobs, s.context.sessions, s.audit)
            assert counts.shredded == 1 and counts.purged == 1, counts
        rows = await audit_rows(b.engine)

    # Every record is chained, the workers' ones on the broker's group chain.
    assert rows and all(r["chain_seq"] is not None and r["chain_mac"] for r in rows)
    refused = only(rows, operation="GetModel")
    assert refused["caller"] == SPIFFE_WORKERS
    assert refused["on_behalf_of"] == dev_certs.spiffe_id("auditor")
    assert (refused["outcome"], refused["reason"]) == ("PERMISSION_DENIED", "PERMISSION_DENIED")
    assert refused["resource"] == "resources/r1"
    assert refused["request_id"] == "refused-call-1"
    expired = only(rows, operation="ExpireAnalyzeResults")
    purged = only(rows, operation="PurgeResourceObjects")
    assert (expired["item_count"], expired["resource"], expired["outcome"]) == (1, None, "OK")
    assert (purged["item_count"], purged["resource"]) == (1, "resources/r2")
    for row in (refused, expired, purged):
        assert row["caller"] == SPIFFE_WORKERS
        assert row["writer"].endswith(":g"), row["writer"]
    assert expired["on_behalf_of"] == retention.CALLER
    # No record of a WriteAuditRecord itself: each call's one record is the workers' record.
    assert not [r for r in rows if r["operation"] == "WriteAuditRecord"]

    code, out = await run_verify(tls)
    assert code == 0, out
    assert "0 unchained" in out and ": OK" in out


@pytest.mark.asyncio
async def test_write_audit_record_is_for_admins_only(settings: Settings, pki: Path) -> None:
    tls = tls_settings(settings, pki)
    request = pb.WriteAuditRecordRequest(operation="ExpireAnalyzeResults", item_count=3)
    async with running_broker(tls, credentials=client_credentials(pki, "admin")) as b:
        for client in ("app", "auditor"):
            before = await state_digest(b.engine)
            async with open_channel(b.running.port, client_credentials(pki, client)) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await pb_grpc.KeyBrokerStub(channel).WriteAuditRecord(request)
            assert_error(err.value, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
            assert await state_digest(b.engine) == before
        async with open_channel(b.running.port, client_credentials(pki, "workers")) as channel:
            await pb_grpc.KeyBrokerStub(channel).WriteAuditRecord(request)
        rows = await audit_rows(b.engine)
    denied = [r for r in rows if r["operation"] == "WriteAuditRecord"]
    assert [(r["caller"], r["outcome"]) for r in denied] == [
        (dev_certs.spiffe_id("app"), "PERMISSION_DENIED"),
        (dev_certs.spiffe_id("auditor"), "PERMISSION_DENIED"),
    ]
    # Nothing of the refused requests was recorded as the workers' operation.
    written = only(rows, operation="ExpireAnalyzeResults")
    assert (written["caller"], written["item_count"]) == (SPIFFE_WORKERS, 3)


BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    (dict(), "MISSING_FIELD"),
    (dict(operation="DestroyResourceKeyVersion"), "UNKNOWN_OPERATION"),
    (dict(operation="WriteAuditRecord"), "UNKNOWN_OPERATION"),
    (dict(operation="getmodel"), "UNKNOWN_OPERATION"),
    (dict(operation="GetModel\x00"), "UNKNOWN_OPERATION"),
    (dict(operation="GetModel", resource="resources/R1"), "INVALID_NAME"),
    (dict(operation="GetModel", resource="resources/r1/models/m1"), "INVALID_NAME"),
    (dict(operation="GetModel", resource="resources/" + "a" * 300), "FIELD_TOO_LONG"),
    (dict(operation="PurgeResourceObjects", item_count=-1), "INVALID_ITEM_COUNT"),
    (dict(operation="GetModel", outcome="DENIED"), "INVALID_OUTCOME"),
    (dict(operation="GetModel", outcome="ok"), "INVALID_OUTCOME"),
    (dict(operation="GetModel", reason="PERMISSION_DENIED"), "INVALID_REASON"),
    (dict(operation="GetModel", outcome="PERMISSION_DENIED", reason="denied"), "INVALID_REASON"),
    (dict(operation="GetModel", outcome="INTERNAL", reason="A" * 65), "INVALID_REASON"),
    (dict(operation="GetModel", on_behalf_of="app\x00"), "INVALID_ON_BEHALF_OF"),
    (dict(operation="GetModel", on_behalf_of="a\nb"), "INVALID_ON_BEHALF_OF"),
    (dict(operation="GetModel", on_behalf_of="a" * 201), "FIELD_TOO_LONG"),
]


@pytest.mark.asyncio
async def test_write_audit_record_refuses_bad_requests(broker: BrokerUnderTest) -> None:
    for fields, reason in BAD_REQUESTS:
        before = await audit_rows(broker.engine)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await broker.stub.WriteAuditRecord(pb.WriteAuditRecordRequest(**fields))
        assert_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, reason)
        details = err.value.details() or ""
        assert details and "\x00" not in details
        after = await audit_rows(broker.engine)
        # The refusal's one record is a WriteAuditRecord's, never the requested operation.
        assert len(after) == len(before) + 1, fields
        assert (after[-1]["operation"], after[-1]["outcome"], after[-1]["reason"]) == (
            "WriteAuditRecord",
            "INVALID_ARGUMENT",
            reason,
        )
        assert after[-1]["resource"] is None


@pytest.mark.asyncio
async def test_write_audit_record_writes_exactly_the_record_asked_for(
    broker: BrokerUnderTest,
) -> None:
    assert {"ExpireAnalyzeResults", "PurgeResourceObjects", "UploadModel", "GetJob"} <= set(
        WORKER_OPERATIONS
    )
    request = pb.WriteAuditRecordRequest(
        operation="DeleteModel",
        resource="resources/r9",  # need not exist: a purged resource is gone from the broker
        item_count=1,
        outcome="PERMISSION_DENIED",
        reason="RESOURCE_NOT_PERMITTED",
        on_behalf_of="spiffe://keybroker.local/app",
    )
    metadata = ((REQUEST_ID_KEY, "req-42"), ("keybroker-on-behalf-of", "ignored"))
    before = await audit_rows(broker.engine)
    reply = await broker.stub.WriteAuditRecord(request, metadata=metadata)
    assert reply == pb.WriteAuditRecordResponse()
    await broker.stub.WriteAuditRecord(pb.WriteAuditRecordRequest(operation="GetModel"))
    rows = (await audit_rows(broker.engine))[len(before) :]
    assert len(rows) == 2
    first, second = rows
    assert first["caller"].startswith("ipv")  # the transport peer: never a name from the request
    assert {k: first[k] for k in ("operation", "resource", "item_count", "outcome")} == {
        "operation": "DeleteModel",
        "resource": "resources/r9",
        "item_count": 1,
        "outcome": "PERMISSION_DENIED",
    }
    assert (first["reason"], first["on_behalf_of"], first["request_id"]) == (
        "RESOURCE_NOT_PERMITTED",
        "spiffe://keybroker.local/app",
        "req-42",
    )
    assert (second["outcome"], second["reason"], second["item_count"]) == ("OK", None, 0)
    assert all(r["chain_seq"] is not None and r["writer"].endswith(":g") for r in rows)


@pytest.mark.asyncio
async def test_keybroker_up_chains_the_sweepers_records_in_process(settings: Settings) -> None:
    clock = Clock()
    up = replace(settings, segment_size=4096, sweep_interval=timedelta(hours=1))
    async with running_broker(up, clock, with_storage=True) as b:
        await b.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
        await store_result(b.storage, "r1", "a1")
        clock.advance(timedelta(hours=24, seconds=1))
        s = b.workers
        counts = await retention.sweep(s.objects, s.objects.blobs, s.context.sessions, s.audit)
        assert counts.shredded == 1
        rows = await audit_rows(b.engine)
    expired = only(rows, operation="ExpireAnalyzeResults")
    assert (expired["caller"], expired["on_behalf_of"]) == (retention.CALLER, None)
    assert expired["chain_seq"] is not None and expired["writer"].endswith(":g")
    code, out = await run_verify(up)
    assert code == 0, out
