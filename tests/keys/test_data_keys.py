"""Data keys through a real broker: round trips, rotation, re-wrap, batches, version destruction."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from broker.api import key_broker_pb2 as pb
from broker.keys.data_key_format import WRAPPED_SIZE
from tests.harness import BrokerUnderTest, assert_error, audit_rows

MODEL = "resources/r1/models/m1"
RESULT = "resources/r1/analyzeResults/a1"


def zero() -> Duration:
    d = Duration()
    d.FromTimedelta(timedelta(0))
    return d


async def create(broker: BrokerUnderTest, resource_id: str = "r1") -> pb.Resource:
    reply = await broker.stub.CreateResource(pb.CreateResourceRequest(resource_id=resource_id))
    return reply.resource


async def generate(
    broker: BrokerUnderTest, name: str = MODEL, ad: bytes = b""
) -> pb.GenerateDataKeyResponse:
    return await broker.stub.GenerateDataKey(
        pb.GenerateDataKeyRequest(name=name, associated_data=ad)
    )


async def decrypt(broker: BrokerUnderTest, name: str, wrapped: bytes, ad: bytes = b"") -> bytes:
    reply = await broker.stub.DecryptDataKey(
        pb.DecryptDataKeyRequest(name=name, wrapped_data_key=wrapped, associated_data=ad)
    )
    return reply.plaintext_data_key


@pytest.mark.asyncio
async def test_generate_then_decrypt_round_trips_for_both_purposes(broker: BrokerUnderTest) -> None:
    await create(broker)
    for name, purpose in ((MODEL, "models"), (RESULT, "results")):
        key = await generate(broker, name, b"ctx")
        assert len(key.plaintext_data_key) == 32
        assert len(key.wrapped_data_key) == WRAPPED_SIZE
        assert key.key_id == f"resources/r1/resourceKeys/{purpose}/versions/1"
        assert key.plaintext_data_key not in key.wrapped_data_key
        reply = await broker.stub.DecryptDataKey(
            pb.DecryptDataKeyRequest(
                name=name, wrapped_data_key=key.wrapped_data_key, associated_data=b"ctx"
            )
        )
        assert reply.plaintext_data_key == key.plaintext_data_key
        assert reply.key_id == key.key_id


@pytest.mark.asyncio
async def test_each_generate_gives_a_fresh_key(broker: BrokerUnderTest) -> None:
    await create(broker)
    a, b = await generate(broker), await generate(broker)
    assert a.plaintext_data_key != b.plaintext_data_key
    assert a.wrapped_data_key != b.wrapped_data_key


@pytest.mark.asyncio
async def test_rotation_keeps_old_keys_decrypting_and_rewrap_moves_them(
    broker: BrokerUnderTest,
) -> None:
    await create(broker)
    old = await generate(broker)
    rotated = await broker.stub.RotateResourceKey(
        pb.RotateResourceKeyRequest(name="resources/r1/resourceKeys/models")
    )
    v2 = rotated.resource_key_version
    assert v2.name == "resources/r1/resourceKeys/models/versions/2"
    assert v2.current and v2.state == pb.ResourceKeyVersion.ENABLED

    new = await generate(broker)
    assert new.key_id == v2.name
    assert await decrypt(broker, MODEL, old.wrapped_data_key) == old.plaintext_data_key

    moved = await broker.stub.RewrapDataKey(
        pb.RewrapDataKeyRequest(name=MODEL, wrapped_data_key=old.wrapped_data_key)
    )
    assert moved.rewrapped and moved.key_id == v2.name
    assert moved.wrapped_data_key != old.wrapped_data_key
    assert await decrypt(broker, MODEL, moved.wrapped_data_key) == old.plaintext_data_key

    again = await broker.stub.RewrapDataKey(
        pb.RewrapDataKeyRequest(name=MODEL, wrapped_data_key=moved.wrapped_data_key)
    )
    assert not again.rewrapped
    assert again.wrapped_data_key == moved.wrapped_data_key

    # The other purpose did not rotate.
    assert (await generate(broker, RESULT)).key_id.endswith("results/versions/1")


@pytest.mark.asyncio
async def test_rewrap_authenticates_even_when_current(broker: BrokerUnderTest) -> None:
    await create(broker)
    key = await generate(broker)
    damaged = key.wrapped_data_key[:-1] + bytes([key.wrapped_data_key[-1] ^ 1])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await broker.stub.RewrapDataKey(
            pb.RewrapDataKeyRequest(name=MODEL, wrapped_data_key=damaged)
        )
    assert_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "DECRYPTION_FAILED")


@pytest.mark.asyncio
async def test_batches_give_each_item_its_own_status(broker: BrokerUnderTest) -> None:
    await create(broker)
    gen = await broker.stub.BatchGenerateDataKeys(
        pb.BatchGenerateDataKeysRequest(
            requests=[
                pb.GenerateDataKeyRequest(name=MODEL),
                pb.GenerateDataKeyRequest(name="resources/nope/models/m1"),
                pb.GenerateDataKeyRequest(name="not a name"),
                pb.GenerateDataKeyRequest(name=RESULT),
            ]
        )
    )
    codes = [r.status.code for r in gen.results]
    assert codes == [
        grpc.StatusCode.OK.value[0],
        grpc.StatusCode.NOT_FOUND.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.OK.value[0],
    ]
    good = gen.results[0].response
    assert len(good.plaintext_data_key) == 32

    damaged = (
        good.wrapped_data_key[:20]
        + bytes([good.wrapped_data_key[20] ^ 0x80])
        + good.wrapped_data_key[21:]
    )
    dec = await broker.stub.BatchDecryptDataKeys(
        pb.BatchDecryptDataKeysRequest(
            requests=[
                pb.DecryptDataKeyRequest(name=MODEL, wrapped_data_key=good.wrapped_data_key),
                pb.DecryptDataKeyRequest(name=MODEL, wrapped_data_key=damaged),
                pb.DecryptDataKeyRequest(
                    name=RESULT, wrapped_data_key=gen.results[3].response.wrapped_data_key
                ),
            ]
        )
    )
    assert [r.status.code for r in dec.results] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert dec.results[0].response.plaintext_data_key == good.plaintext_data_key
    assert dec.results[1].status.message == "wrapped data key could not be decrypted"
    assert not dec.results[1].HasField("response")

    await broker.stub.RotateResourceKey(
        pb.RotateResourceKeyRequest(name="resources/r1/resourceKeys/models")
    )
    rew = await broker.stub.BatchRewrapDataKeys(
        pb.BatchRewrapDataKeysRequest(
            requests=[
                pb.RewrapDataKeyRequest(name=MODEL, wrapped_data_key=good.wrapped_data_key),
                pb.RewrapDataKeyRequest(name=MODEL, wrapped_data_key=damaged),
            ]
        )
    )
    assert rew.results[0].status.code == 0 and rew.results[0].response.rewrapped
    assert rew.results[0].response.key_id.endswith("models/versions/2")
    assert rew.results[1].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]

    # One audit record per batch RPC, counting items and failures.
    batch_rows = [r for r in await audit_rows(broker.engine) if r["operation"].startswith("Batch")]
    assert [(r["operation"], r["item_count"], r["failed_count"]) for r in batch_rows] == [
        ("BatchGenerateDataKeys", 4, 2),
        ("BatchDecryptDataKeys", 3, 1),
        ("BatchRewrapDataKeys", 2, 1),
    ]


@pytest.mark.asyncio
async def test_destroying_a_version_stops_its_keys_after_the_window(
    broker: BrokerUnderTest,
) -> None:
    await create(broker)
    old = await generate(broker)
    await broker.stub.RotateResourceKey(
        pb.RotateResourceKeyRequest(name="resources/r1/resourceKeys/models")
    )
    v1 = "resources/r1/resourceKeys/models/versions/1"

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await broker.stub.DestroyResourceKeyVersion(
            pb.DestroyResourceKeyVersionRequest(name="resources/r1/resourceKeys/models/versions/2")
        )
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "KEY_VERSION_IS_CURRENT")

    scheduled = (
        await broker.stub.DestroyResourceKeyVersion(pb.DestroyResourceKeyVersionRequest(name=v1))
    ).resource_key_version
    assert scheduled.state == pb.ResourceKeyVersion.DESTROY_SCHEDULED
    window = scheduled.destroy_time.ToDatetime() - scheduled.create_time.ToDatetime()
    assert timedelta(days=6, hours=23) < window <= timedelta(days=7, seconds=5)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await decrypt(broker, MODEL, old.wrapped_data_key)
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "KEY_VERSION_DESTROY_SCHEDULED")

    restored = await broker.stub.RestoreResourceKeyVersion(
        pb.RestoreResourceKeyVersionRequest(name=v1)
    )
    assert restored.resource_key_version.state == pb.ResourceKeyVersion.ENABLED
    assert await decrypt(broker, MODEL, old.wrapped_data_key) == old.plaintext_data_key

    await broker.stub.DestroyResourceKeyVersion(pb.DestroyResourceKeyVersionRequest(name=v1))
    broker.clock.advance(timedelta(days=7, seconds=1))
    from broker.lifecycle.janitor import tick

    assert await tick(broker.running.broker.lifecycle) == (1, 0, 0)
    listed = await broker.stub.ListResourceKeyVersions(
        pb.ListResourceKeyVersionsRequest(parent="resources/r1/resourceKeys/models")
    )
    states = {v.name: v.state for v in listed.resource_key_versions}
    assert states[v1] == pb.ResourceKeyVersion.DESTROYED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await decrypt(broker, MODEL, old.wrapped_data_key)
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "KEY_VERSION_DESTROYED")

    # The material is gone from SQL, not just flagged.
    from sqlalchemy import text

    async with broker.engine.connect() as conn:
        wrapped = (
            await conn.execute(
                text(
                    "SELECT wrapped_key FROM key_versions"
                    " WHERE resource_id = 'r1' AND purpose = 'models' AND version = 1"
                )
            )
        ).scalar_one()
    assert wrapped is None


@pytest.mark.asyncio
async def test_zero_window_destroys_at_once(broker: BrokerUnderTest) -> None:
    await create(broker)
    old = await generate(broker)
    await broker.stub.RotateResourceKey(
        pb.RotateResourceKeyRequest(name="resources/r1/resourceKeys/models")
    )
    reply = await broker.stub.DestroyResourceKeyVersion(
        pb.DestroyResourceKeyVersionRequest(
            name="resources/r1/resourceKeys/models/versions/1", pending_window=zero()
        )
    )
    assert reply.resource_key_version.state == pb.ResourceKeyVersion.DESTROYED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await decrypt(broker, MODEL, old.wrapped_data_key)
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "KEY_VERSION_DESTROYED")


@pytest.mark.asyncio
async def test_rotation_by_age(broker: BrokerUnderTest) -> None:
    from broker.lifecycle.janitor import tick

    await create(broker)
    old = await generate(broker)
    assert await tick(broker.running.broker.lifecycle) == (0, 0, 0)
    broker.clock.advance(timedelta(days=90, seconds=1))
    assert await tick(broker.running.broker.lifecycle) == (0, 0, 2)
    assert (await generate(broker)).key_id.endswith("models/versions/2")
    assert (await generate(broker, RESULT)).key_id.endswith("results/versions/2")
    assert await decrypt(broker, MODEL, old.wrapped_data_key) == old.plaintext_data_key
    assert await tick(broker.running.broker.lifecycle) == (0, 0, 0)


@pytest.mark.asyncio
async def test_every_answered_call_is_audited(broker: BrokerUnderTest) -> None:
    await create(broker)
    key = await generate(broker)
    await decrypt(broker, MODEL, key.wrapped_data_key)
    with pytest.raises(grpc.aio.AioRpcError):
        await decrypt(broker, "resources/r1/models/other", key.wrapped_data_key)
    with pytest.raises(grpc.aio.AioRpcError):
        await generate(broker, "resources/missing/models/m1")
    rows = await audit_rows(broker.engine)
    summary = [(r["operation"], r["resource"], r["outcome"], r["reason"]) for r in rows]
    assert summary == [
        ("CreateResource", "resources/r1", "OK", None),
        ("GenerateDataKey", MODEL, "OK", None),
        ("DecryptDataKey", MODEL, "OK", None),
        ("DecryptDataKey", "resources/r1/models/other", "INVALID_ARGUMENT", "DECRYPTION_FAILED"),
        ("GenerateDataKey", "resources/missing/models/m1", "NOT_FOUND", "RESOURCE_NOT_FOUND"),
    ]
    assert rows[1]["key_ids"] == "resources/r1/resourceKeys/models/versions/1"
    assert all(r["caller"].startswith("ipv4:127.0.0.1") for r in rows)
    # No key material in the trail.
    for r in rows:
        assert key.plaintext_data_key.hex() not in repr(r)
