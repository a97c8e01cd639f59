"""Limits (broker.core.limits) through a real server: message size, batch size, name and
associated-data lengths on every RPC, open Storage streams per caller, and the server's own
bound on a call's run time. Each is refused with a precise status, and nothing stored changes."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.descriptor import FieldDescriptor
from sqlalchemy import text

from broker.api import key_broker_pb2 as pb
from broker.api import storage_pb2 as spb
from broker.core.errors import KeybrokerError
from broker.core.limits import (
    MAX_ASSOCIATED_DATA_LENGTH,
    MAX_BATCH_SIZE,
    MAX_MESSAGE_BYTES,
    MAX_NAME_LENGTH,
    MAX_STREAMS_PER_CALLER,
    MAX_WRAPPED_KEY_LENGTH,
)
from broker.core.settings import Settings
from broker.rpc.stream_limits import StreamLimiter, caller_key
from tests.harness import BrokerUnderTest, assert_error, audit_rows, running_broker, state_digest
from tests.rpcs import all_methods, call

MODEL = "resources/r1/models/m1"
# Fields that carry a resource or object name (or a resource id) in a request.
NAME_FIELDS = ("name", "parent", "model", "resource_id")
# RPCs whose name is not a resource name, and so gets a different reason when too long.
OTHER_NAME_REASONS = {"GetJob": "INVALID_NAME"}


@pytest_asyncio.fixture
async def kb(settings: Settings) -> AsyncIterator[BrokerUnderTest]:
    async with running_broker(replace(settings, segment_size=4096), with_storage=True) as b:
        await b.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
        yield b


def blob_files(settings: Settings) -> list[Path]:
    return sorted(p for p in settings.blob_dir.rglob("*") if p.is_file())


def upload_header(name: str) -> spb.UploadModelRequest:
    return spb.UploadModelRequest(header=spb.UploadModelRequest.Header(name=name))


# -- message size --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_oversized_messages_are_refused_before_any_handler(kb: BrokerUnderTest) -> None:
    before = await state_digest(kb.engine)
    records = len(await audit_rows(kb.engine))
    big = os.urandom(MAX_MESSAGE_BYTES + 1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.stub.GenerateDataKey(pb.GenerateDataKeyRequest(name=MODEL, associated_data=big))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # gRPC refused the message itself: no handler ran, so nothing was audited.
    assert len(await audit_rows(kb.engine)) == records

    async def chunks() -> AsyncIterator[spb.UploadModelRequest]:
        yield upload_header(MODEL)
        yield spb.UploadModelRequest(chunk=big)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.storage.UploadModel(chunks())
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await state_digest(kb.engine) == before
    # The upload's header was read before its oversized chunk: the partial blob is gone.
    assert blob_files(kb.settings) == []


@pytest.mark.asyncio
async def test_the_largest_legitimate_request_fits(kb: BrokerUnderTest) -> None:
    """A full batch with every field at its limit is over gRPC's default 4 MiB: the limit is set
    on purpose, above what a valid request can need."""
    name = "resources/r1/models/" + "m" * 64
    item = pb.DecryptDataKeyRequest(
        name=name,
        wrapped_data_key=os.urandom(MAX_WRAPPED_KEY_LENGTH),
        associated_data=os.urandom(MAX_ASSOCIATED_DATA_LENGTH),
    )
    request = pb.BatchDecryptDataKeysRequest(requests=[item] * MAX_BATCH_SIZE)
    assert 4 << 20 < request.ByteSize() < MAX_MESSAGE_BYTES
    reply = await kb.stub.BatchDecryptDataKeys(request)
    assert len(reply.results) == MAX_BATCH_SIZE
    assert {r.status.code for r in reply.results} == {grpc.StatusCode.INVALID_ARGUMENT.value[0]}


# -- batch size, name and associated-data lengths ------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "rpc", ["BatchGenerateDataKeys", "BatchDecryptDataKeys", "BatchRewrapDataKeys"]
)
async def test_batch_size_limits(kb: BrokerUnderTest, rpc: str) -> None:
    method = getattr(kb.stub, rpc)
    batch, one = {
        "BatchGenerateDataKeys": (pb.BatchGenerateDataKeysRequest, pb.GenerateDataKeyRequest),
        "BatchDecryptDataKeys": (pb.BatchDecryptDataKeysRequest, pb.DecryptDataKeyRequest),
        "BatchRewrapDataKeys": (pb.BatchRewrapDataKeysRequest, pb.RewrapDataKeyRequest),
    }[rpc]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await method(batch(requests=[one(name=MODEL)] * (MAX_BATCH_SIZE + 1)))
    assert_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await method(batch())
    assert_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "MISSING_FIELD")


def _with_long_names(request: Any, value: str) -> bool:
    """Sets every name field of `request` (and of a stream header) to `value`; False if none."""
    found = False
    for field in request.DESCRIPTOR.fields:
        if field.name in NAME_FIELDS and field.type == FieldDescriptor.TYPE_STRING:
            setattr(request, field.name, value)
            found = True
        elif field.type == FieldDescriptor.TYPE_ENUM and len(field.enum_type.values) > 1:
            # A valid choice, so that the name is what the call is refused for.
            setattr(request, field.name, field.enum_type.values[-1].number)
        elif field.name == "header" and field.message_type is not None:
            found = _with_long_names(request.header, value) or found
    return found


@pytest.mark.asyncio
async def test_every_rpc_refuses_an_overlong_name(kb: BrokerUnderTest) -> None:
    """Every RPC with a name field, KeyBroker and Storage alike (from the descriptors), refuses
    a name one character over MAX_NAME_LENGTH with INVALID_ARGUMENT; batch items per item."""
    long_name = "resources/" + "r" * (MAX_NAME_LENGTH + 1 - len("resources/"))
    assert len(long_name) == MAX_NAME_LENGTH + 1
    before = await state_digest(kb.engine)
    checked = []
    for rpc in all_methods():
        request: Any = rpc.request()
        items = None
        if "requests" in request.DESCRIPTOR.fields_by_name:
            items = request.requests.add()
            assert _with_long_names(items, long_name)
        elif not _with_long_names(request, long_name):
            continue
        checked.append(rpc.name)
        try:
            replies = await call(kb.channel, rpc, [request], deadline=10)
        except grpc.aio.AioRpcError as exc:
            assert items is None, rpc.name
            assert_error(
                exc,
                grpc.StatusCode.INVALID_ARGUMENT,
                OTHER_NAME_REASONS.get(rpc.name, "FIELD_TOO_LONG"),
            )
            continue
        assert items is not None, f"{rpc.name} accepted an over-long name"
        (status,) = [r.status for r in replies[0].results]  # type: ignore[attr-defined]
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], rpc.name
    assert {"GenerateDataKey", "UploadModel", "GetJob", "ListModels", "CreateResource"} <= set(
        checked
    )
    assert await state_digest(kb.engine) == before
    assert blob_files(kb.settings) == []


@pytest.mark.asyncio
async def test_associated_data_length(kb: BrokerUnderTest) -> None:
    ok = await kb.stub.GenerateDataKey(
        pb.GenerateDataKeyRequest(name=MODEL, associated_data=b"a" * MAX_ASSOCIATED_DATA_LENGTH)
    )
    too_long = b"a" * (MAX_ASSOCIATED_DATA_LENGTH + 1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.stub.GenerateDataKey(
            pb.GenerateDataKeyRequest(name=MODEL, associated_data=too_long)
        )
    assert_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "FIELD_TOO_LONG")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.stub.DecryptDataKey(
            pb.DecryptDataKeyRequest(
                name=MODEL, wrapped_data_key=ok.wrapped_data_key, associated_data=too_long
            )
        )
    assert_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "FIELD_TOO_LONG")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.stub.RewrapDataKey(
            pb.RewrapDataKeyRequest(
                name=MODEL, wrapped_data_key=ok.wrapped_data_key, associated_data=too_long
            )
        )
    assert_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "FIELD_TOO_LONG")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.stub.DecryptDataKey(
            pb.DecryptDataKeyRequest(
                name=MODEL, wrapped_data_key=os.urandom(MAX_WRAPPED_KEY_LENGTH + 1)
            )
        )
    assert_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "FIELD_TOO_LONG")


# -- open streams per caller ---------------------------------------------------------------------


def test_caller_key_drops_the_port_of_a_transport_peer() -> None:
    assert caller_key("ipv4:127.0.0.1:50123") == caller_key("ipv4:127.0.0.1:50999")
    assert caller_key("ipv6:[::1]:50123") == "ipv6:[::1]"
    assert caller_key("spiffe://example/worker") == "spiffe://example/worker"
    limiter = StreamLimiter(limit=1)
    with limiter.hold("ipv4:10.0.0.1:1"):
        assert limiter.open_streams("ipv4:10.0.0.1:2") == 1
        with limiter.hold("ipv4:10.0.0.2:1"):  # another caller has its own count
            pass
        with pytest.raises(KeybrokerError) as err, limiter.hold("ipv4:10.0.0.1:3"):
            pass
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert limiter.open_streams("ipv4:10.0.0.1:2") == 0


@pytest.mark.asyncio
async def test_open_streams_per_caller(kb: BrokerUnderTest) -> None:
    """MAX_STREAMS_PER_CALLER uploads held open (over two connections: they count together);
    the next upload and a download are RESOURCE_EXHAUSTED; once one ends, a new one works."""
    data = os.urandom(5000)
    await kb.storage.UploadModel(
        _requests([upload_header(MODEL), spb.UploadModelRequest(chunk=data)])
    )
    before = await state_digest(kb.engine)
    other = grpc.aio.insecure_channel(f"127.0.0.1:{kb.running.port}")
    gates = [asyncio.Event() for _ in range(MAX_STREAMS_PER_CALLER)]
    calls = []
    for i, gate in enumerate(gates):
        channel = kb.channel if i % 2 else other
        upload = channel.stream_unary(
            "/keybroker.v1.Storage/UploadModel",
            spb.UploadModelRequest.SerializeToString,
            spb.UploadModelResponse.FromString,
        )
        calls.append(upload(_held_open(f"resources/r1/models/held{i}", gate), timeout=30))
    try:
        await _until_open(kb, MAX_STREAMS_PER_CALLER)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await kb.storage.UploadModel(_requests([upload_header(MODEL)]))
        assert_error(err.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in kb.storage.DownloadModel(spb.DownloadModelRequest(name=MODEL)):
                pass
        assert_error(err.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS")
        assert await state_digest(kb.engine) == before
        gates[0].set()
        await calls[0]
        await _until_open(kb, MAX_STREAMS_PER_CALLER - 1)
        parts = [m async for m in kb.storage.DownloadModel(spb.DownloadModelRequest(name=MODEL))]
        assert b"".join(p.chunk for p in parts[1:]) == data
    finally:
        for gate in gates:
            gate.set()
        await asyncio.gather(*calls, return_exceptions=True)
        await other.close()
    await _until_open(kb, 0)


def _requests(messages: list[spb.UploadModelRequest]) -> Any:
    async def gen() -> AsyncIterator[spb.UploadModelRequest]:
        for m in messages:
            yield m

    return gen()


async def _held_open(name: str, gate: asyncio.Event) -> AsyncIterator[spb.UploadModelRequest]:
    yield upload_header(name)
    yield spb.UploadModelRequest(chunk=b"x" * 100)
    await gate.wait()


async def _until_open(kb: BrokerUnderTest, count: int) -> None:
    limiter: StreamLimiter = kb.workers.service._streams
    for _ in range(400):
        if limiter.open_streams("ipv4:127.0.0.1:1") == count:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{limiter.open_streams('ipv4:127.0.0.1:1')} streams open, not {count}")


# -- the server's bound on a call's run time -----------------------------------------------------


@pytest.mark.asyncio
async def test_a_stream_without_deadline_is_bounded(
    settings: Settings,
) -> None:
    """An upload that stalls after its header, from a caller that set no deadline, ends with
    DEADLINE_EXCEEDED at the server's bound; its partial blob is removed; nothing stored changes.
    (The bound is shortened here: KEYBROKER_MAX_STREAM_DURATION.)"""
    bounded = replace(settings, segment_size=4096, max_stream_duration=timedelta(seconds=1))
    async with running_broker(bounded, with_storage=True) as kb:
        await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
        before = await state_digest(kb.engine)
        gate = asyncio.Event()
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await kb.storage.UploadModel(_held_open(MODEL, gate))  # no deadline of its own
        elapsed = time.monotonic() - started
        gate.set()
        assert_error(err.value, grpc.StatusCode.DEADLINE_EXCEEDED, "SERVER_DEADLINE_EXCEEDED")
        assert 0.9 < elapsed < 10, elapsed
        assert await state_digest(kb.engine) == before
        assert blob_files(kb.settings) == []
        # A caller's own, earlier deadline is still gRPC's business.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await kb.storage.UploadModel(_held_open(MODEL, asyncio.Event()), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server is fine afterwards.
        await kb.storage.UploadModel(_requests([upload_header(MODEL)]))


@pytest.mark.asyncio
async def test_a_bounded_unary_call_still_finishes_its_transaction(
    settings: Settings,
) -> None:
    """With a bound far shorter than any call, every unary call answers DEADLINE_EXCEEDED, yet
    work that touches SQL runs detached: the state change and its audit record complete, and the
    database connections stay usable (no cancellation inside a driver call)."""
    bounded = replace(settings, max_unary_duration=timedelta(microseconds=1))
    async with running_broker(bounded) as kb:
        for resource_id in ("r1", "r2", "r3"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id=resource_id))
            assert_error(err.value, grpc.StatusCode.DEADLINE_EXCEEDED, "SERVER_DEADLINE_EXCEEDED")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await kb.stub.GenerateDataKey(pb.GenerateDataKeyRequest(name=MODEL))
        assert_error(err.value, grpc.StatusCode.DEADLINE_EXCEEDED, "SERVER_DEADLINE_EXCEEDED")
        await kb.running.broker.service.detached.wait_all()
        rows = await audit_rows(kb.engine)
        # The detached transactions may finish in any order (the calls did not wait for them).
        created = sorted(
            r["resource"]
            for r in rows
            if r["operation"] == "CreateResource" and r["outcome"] == "OK"
        )
        assert created == ["resources/r1", "resources/r2", "resources/r3"]
        async with kb.engine.connect() as conn:
            count = (await conn.execute(text("SELECT count(*) FROM resources"))).scalar_one()
        assert count == 3


@pytest.mark.asyncio
async def test_a_download_is_bounded_and_gives_its_stream_back(
    settings: Settings,
) -> None:
    """A download whose caller stops reading past the bound ends with DEADLINE_EXCEEDED once it
    reads again (the server does not cancel it inside gRPC's send, it stops at its next
    message), having sent only a prefix of the model; its stream slot is given back."""
    bounded = replace(settings, segment_size=4096, max_stream_duration=timedelta(seconds=1))
    async with running_broker(bounded, with_storage=True) as kb:
        await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
        data = os.urandom(8 << 20)  # far more than gRPC buffers for a caller that does not read
        parts = [upload_header(MODEL)] + [
            spb.UploadModelRequest(chunk=data[i : i + (1 << 20)])
            for i in range(0, len(data), 1 << 20)
        ]
        await kb.storage.UploadModel(_requests(parts))
        received = bytearray()

        async def read_slowly() -> None:
            request = spb.DownloadModelRequest(name=MODEL)
            async for message in kb.storage.DownloadModel(request):
                if message.WhichOneof("part") == "model":
                    await asyncio.sleep(1.6)  # past the bound, the server blocked on sending
                else:
                    received.extend(message.chunk)

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await read_slowly()
        assert_error(err.value, grpc.StatusCode.DEADLINE_EXCEEDED, "SERVER_DEADLINE_EXCEEDED")
        assert len(received) < len(data)
        assert data.startswith(bytes(received))
        await _until_open(kb, 0)
