"""Resources through a real broker: create, import, get, list, delete/undelete/destroy, versions,
status, and the audit record of every state change."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import text
from sqlalchemy.engine import make_url

from broker.api import key_broker_pb2 as pb
from broker.lifecycle.janitor import tick
from tests.harness import BrokerUnderTest, assert_error, audit_rows

MODEL = "resources/r1/models/m1"
RESULT = "resources/r1/analyzeResults/a1"
STATE_CHANGES = {
    "CreateResource",
    "ImportResource",
    "DeleteResource",
    "UndeleteResource",
    "RotateResourceKey",
    "DestroyResourceKeyVersion",
    "RestoreResourceKeyVersion",
    "DestroyResource",
    "DestroyResourceKeyVersionMaterial",
}


def duration(delta: timedelta) -> Duration:
    d = Duration()
    d.FromTimedelta(delta)
    return d


def stamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def when(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def close(a: datetime, b: datetime, slack: timedelta = timedelta(seconds=2)) -> bool:
    return abs(a - b) <= slack


async def create(broker: BrokerUnderTest, resource_id: str = "r1") -> pb.Resource:
    reply = await broker.stub.CreateResource(pb.CreateResourceRequest(resource_id=resource_id))
    return reply.resource


async def get(broker: BrokerUnderTest, name: str = "resources/r1") -> pb.Resource:
    return (await broker.stub.GetResource(pb.GetResourceRequest(name=name))).resource


async def generate(broker: BrokerUnderTest, name: str = MODEL) -> pb.GenerateDataKeyResponse:
    return await broker.stub.GenerateDataKey(pb.GenerateDataKeyRequest(name=name))


async def decrypt(broker: BrokerUnderTest, name: str, wrapped: bytes) -> bytes:
    reply = await broker.stub.DecryptDataKey(
        pb.DecryptDataKeyRequest(name=name, wrapped_data_key=wrapped)
    )
    return reply.plaintext_data_key


async def assert_data_keys_refused(
    broker: BrokerUnderTest, wrapped: bytes, reason: str, name: str = MODEL
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(broker, name)
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, reason)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await decrypt(broker, name, wrapped)
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, reason)


async def state_change_rows(broker: BrokerUnderTest) -> list[tuple[str, str | None, str]]:
    return [
        (r["operation"], r["resource"], r["outcome"])
        for r in await audit_rows(broker.engine)
        if r["operation"] in STATE_CHANGES
    ]


@pytest.mark.asyncio
async def test_create_then_get(broker: BrokerUnderTest) -> None:
    created = await create(broker)
    got = await get(broker)
    assert got == created
    assert got.name == "resources/r1"
    assert got.state == pb.Resource.ACTIVE
    assert not got.imported
    assert not got.HasField("purge_time") and not got.HasField("destroy_time")
    create_time = when(got.create_time)
    assert close(create_time, broker.clock.now())
    assert sorted(e.purpose for e in got.encryption) == [pb.MODELS, pb.RESULTS]
    for enc in got.encryption:
        purpose = "models" if enc.purpose == pb.MODELS else "results"
        assert enc.key_source == pb.SERVICE_MANAGED
        assert enc.root_key_id == "resources/r1/serviceRootKey/versions/1"
        assert enc.current_key_version == f"resources/r1/resourceKeys/{purpose}/versions/1"
        assert close(when(enc.next_rotation_time), create_time + timedelta(days=90))


@pytest.mark.asyncio
async def test_create_twice_and_unknown_get(broker: BrokerUnderTest) -> None:
    await create(broker)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(broker)
    assert_error(err.value, grpc.StatusCode.ALREADY_EXISTS, "RESOURCE_ALREADY_EXISTS")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await get(broker, "resources/nope")
    assert_error(err.value, grpc.StatusCode.NOT_FOUND, "RESOURCE_NOT_FOUND")


@pytest.mark.asyncio
async def test_import_sets_the_given_past_create_time(broker: BrokerUnderTest) -> None:
    past = datetime(2021, 3, 4, 5, 6, 7, tzinfo=UTC)
    reply = await broker.stub.ImportResource(
        pb.ImportResourceRequest(resource_id="old", create_time=stamp(past))
    )
    assert reply.resource.imported
    assert when(reply.resource.create_time) == past
    got = await get(broker, "resources/old")
    assert got.imported and when(got.create_time) == past
    assert got.state == pb.Resource.ACTIVE
    assert len(got.encryption) == 2
    # Rotation is scheduled from now, not from the (old) creation time.
    for enc in got.encryption:
        assert close(when(enc.next_rotation_time), broker.clock.now() + timedelta(days=90))
    # The imported resource works for data keys.
    key = await generate(broker, "resources/old/models/m")
    assert await decrypt(broker, "resources/old/models/m", key.wrapped_data_key) == (
        key.plaintext_data_key
    )


@pytest.mark.asyncio
async def test_import_refuses_a_future_or_missing_create_time(broker: BrokerUnderTest) -> None:
    future = broker.clock.now() + timedelta(hours=1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await broker.stub.ImportResource(
            pb.ImportResourceRequest(resource_id="r1", create_time=stamp(future))
        )
    assert_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CREATE_TIME")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await broker.stub.ImportResource(pb.ImportResourceRequest(resource_id="r1"))
    assert_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "MISSING_FIELD")
    # Nothing was created.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await get(broker)
    assert_error(err.value, grpc.StatusCode.NOT_FOUND, "RESOURCE_NOT_FOUND")


@pytest.mark.asyncio
async def test_list_resources_pages(broker: BrokerUnderTest) -> None:
    ids = [f"res-{i}" for i in (6, 0, 3, 1, 5, 2, 4)]
    for resource_id in ids:
        await create(broker, resource_id)
    expected = [f"resources/res-{i}" for i in range(7)]

    names: list[str] = []
    sizes: list[int] = []
    token = ""
    while True:
        page = await broker.stub.ListResources(
            pb.ListResourcesRequest(page_size=3, page_token=token)
        )
        sizes.append(len(page.resources))
        names.extend(r.name for r in page.resources)
        token = page.next_page_token
        if not token:
            break
    assert sizes == [3, 3, 1]
    assert names == expected

    everything = await broker.stub.ListResources(pb.ListResourcesRequest(page_size=0))
    assert [r.name for r in everything.resources] == expected
    assert everything.next_page_token == ""
    assert all(len(r.encryption) == 2 for r in everything.resources)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await broker.stub.ListResources(pb.ListResourcesRequest(page_token="garbage"))
    assert_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


@pytest.mark.asyncio
async def test_delete_undelete_then_destroy_after_the_window(broker: BrokerUnderTest) -> None:
    await create(broker)
    model_key, result_key = await generate(broker), await generate(broker, RESULT)

    deleted = (
        await broker.stub.DeleteResource(pb.DeleteResourceRequest(name="resources/r1"))
    ).resource
    assert deleted.state == pb.Resource.DELETE_SCHEDULED
    assert deleted.HasField("purge_time")
    window = when(deleted.purge_time) - broker.clock.now()
    assert timedelta(days=7) - timedelta(seconds=5) < window <= timedelta(days=7)
    assert (await get(broker)) == deleted
    await assert_data_keys_refused(broker, model_key.wrapped_data_key, "RESOURCE_DELETE_SCHEDULED")
    await assert_data_keys_refused(
        broker, result_key.wrapped_data_key, "RESOURCE_DELETE_SCHEDULED", RESULT
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await broker.stub.DeleteResource(pb.DeleteResourceRequest(name="resources/r1"))
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "RESOURCE_NOT_ACTIVE")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await broker.stub.RotateResourceKey(
            pb.RotateResourceKeyRequest(name="resources/r1/resourceKeys/models")
        )
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "RESOURCE_NOT_ACTIVE")

    undeleted = (
        await broker.stub.UndeleteResource(pb.UndeleteResourceRequest(name="resources/r1"))
    ).resource
    assert undeleted.state == pb.Resource.ACTIVE
    assert not undeleted.HasField("purge_time")
    assert await decrypt(broker, MODEL, model_key.wrapped_data_key) == model_key.plaintext_data_key
    assert (
        await decrypt(broker, RESULT, result_key.wrapped_data_key) == result_key.plaintext_data_key
    )

    lifecycle = broker.running.broker.lifecycle
    again = (
        await broker.stub.DeleteResource(pb.DeleteResourceRequest(name="resources/r1"))
    ).resource
    broker.clock.advance(timedelta(days=7) - timedelta(seconds=1))
    assert await tick(lifecycle) == (0, 0, 0)  # not due yet
    assert (await get(broker)).state == pb.Resource.DELETE_SCHEDULED
    broker.clock.advance(timedelta(seconds=2))
    assert broker.clock.now() > when(again.purge_time)
    assert await tick(lifecycle) == (0, 1, 0)
    assert await tick(lifecycle) == (0, 0, 0)  # idempotent

    destroyed = await get(broker)
    assert destroyed.state == pb.Resource.DESTROYED
    assert destroyed.HasField("destroy_time")
    assert close(when(destroyed.destroy_time), broker.clock.now())
    assert not destroyed.encryption

    async with broker.engine.connect() as conn:
        root, master_key_id = (
            await conn.execute(
                text("SELECT root_key_sealed, master_key_id FROM resources WHERE id = 'r1'")
            )
        ).one()
        versions = (
            await conn.execute(
                text(
                    "SELECT state, wrapped_key, root_key_id FROM key_versions"
                    " WHERE resource_id = 'r1'"
                )
            )
        ).all()
    assert root is None and master_key_id is None
    assert len(versions) == 2
    assert all(tuple(v) == ("destroyed", None, None) for v in versions)

    await assert_data_keys_refused(broker, model_key.wrapped_data_key, "RESOURCE_DESTROYED")
    await assert_data_keys_refused(
        broker, result_key.wrapped_data_key, "RESOURCE_DESTROYED", RESULT
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(broker)
    assert_error(err.value, grpc.StatusCode.ALREADY_EXISTS, "RESOURCE_ALREADY_EXISTS")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await broker.stub.UndeleteResource(pb.UndeleteResourceRequest(name="resources/r1"))
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "RESOURCE_NOT_DELETE_SCHEDULED")

    assert await state_change_rows(broker) == [
        ("CreateResource", "resources/r1", "OK"),
        ("DeleteResource", "resources/r1", "OK"),
        ("DeleteResource", "resources/r1", "FAILED_PRECONDITION"),
        ("RotateResourceKey", "resources/r1", "FAILED_PRECONDITION"),
        ("UndeleteResource", "resources/r1", "OK"),
        ("DeleteResource", "resources/r1", "OK"),
        ("DestroyResource", "resources/r1", "OK"),
        ("CreateResource", "resources/r1", "ALREADY_EXISTS"),
        ("UndeleteResource", "resources/r1", "FAILED_PRECONDITION"),
    ]


@pytest.mark.asyncio
async def test_delete_with_zero_window_destroys_at_once(broker: BrokerUnderTest) -> None:
    await create(broker)
    await create(broker, "other")
    key = await generate(broker)
    deleted = (
        await broker.stub.DeleteResource(
            pb.DeleteResourceRequest(name="resources/r1", pending_window=duration(timedelta(0)))
        )
    ).resource
    assert deleted.state == pb.Resource.DESTROYED
    assert not deleted.encryption
    await assert_data_keys_refused(broker, key.wrapped_data_key, "RESOURCE_DESTROYED")
    async with broker.engine.connect() as conn:
        root = (
            await conn.execute(text("SELECT root_key_sealed FROM resources WHERE id = 'r1'"))
        ).scalar_one()
        wrapped = (
            await conn.execute(
                text("SELECT wrapped_key FROM key_versions WHERE resource_id = 'r1'")
            )
        ).scalars()
        assert root is None
        assert list(wrapped) == [None, None]
        others = (
            await conn.execute(
                text("SELECT wrapped_key FROM key_versions WHERE resource_id = 'other'")
            )
        ).scalars()
        assert all(w is not None for w in others)  # only r1 was touched
    assert await tick(broker.running.broker.lifecycle) == (0, 0, 0)
    # A zero-window delete is one state change: one record, no separate DestroyResource.
    rows = [r for r in await state_change_rows(broker) if r[1] == "resources/r1"]
    assert rows == [
        ("CreateResource", "resources/r1", "OK"),
        ("DeleteResource", "resources/r1", "OK"),
    ]


@pytest.mark.asyncio
async def test_delete_window_out_of_range(broker: BrokerUnderTest) -> None:
    await create(broker)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await broker.stub.DeleteResource(
            pb.DeleteResourceRequest(
                name="resources/r1", pending_window=duration(timedelta(days=121))
            )
        )
    assert_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PENDING_WINDOW")
    assert (await get(broker)).state == pb.Resource.ACTIVE


@pytest.mark.asyncio
async def test_undelete_of_an_active_resource_is_refused(broker: BrokerUnderTest) -> None:
    await create(broker)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await broker.stub.UndeleteResource(pb.UndeleteResourceRequest(name="resources/r1"))
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "RESOURCE_NOT_DELETE_SCHEDULED")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await broker.stub.UndeleteResource(pb.UndeleteResourceRequest(name="resources/nope"))
    assert_error(err.value, grpc.StatusCode.NOT_FOUND, "RESOURCE_NOT_FOUND")
    assert (await get(broker)).state == pb.Resource.ACTIVE


@pytest.mark.asyncio
async def test_list_key_versions_newest_first_with_paging(broker: BrokerUnderTest) -> None:
    await create(broker)
    parent = "resources/r1/resourceKeys/models"
    for _ in range(4):
        await broker.stub.RotateResourceKey(pb.RotateResourceKeyRequest(name=parent))
    await broker.stub.DestroyResourceKeyVersion(
        pb.DestroyResourceKeyVersionRequest(name=f"{parent}/versions/3")
    )
    await broker.stub.DestroyResourceKeyVersion(
        pb.DestroyResourceKeyVersionRequest(
            name=f"{parent}/versions/1", pending_window=duration(timedelta(0))
        )
    )

    pages: list[list[pb.ResourceKeyVersion]] = []
    token = ""
    while True:
        page = await broker.stub.ListResourceKeyVersions(
            pb.ListResourceKeyVersionsRequest(parent=parent, page_size=2, page_token=token)
        )
        pages.append(list(page.resource_key_versions))
        token = page.next_page_token
        if not token:
            break
    assert [[v.version for v in p] for p in pages] == [[5, 4], [3, 2], [1]]
    versions = [v for p in pages for v in p]
    assert [v.name for v in versions] == [f"{parent}/versions/{n}" for n in (5, 4, 3, 2, 1)]
    assert [v.current for v in versions] == [True, False, False, False, False]
    assert [v.state for v in versions] == [
        pb.ResourceKeyVersion.ENABLED,
        pb.ResourceKeyVersion.ENABLED,
        pb.ResourceKeyVersion.DESTROY_SCHEDULED,
        pb.ResourceKeyVersion.ENABLED,
        pb.ResourceKeyVersion.DESTROYED,
    ]
    assert all(v.purpose == pb.MODELS for v in versions)
    assert versions[0].root_key_id == "resources/r1/serviceRootKey/versions/1"
    assert versions[4].root_key_id == ""  # destroyed: no longer wrapped by anything
    assert versions[2].HasField("destroy_time") and not versions[2].HasField("destroy_event_time")
    assert versions[4].HasField("destroy_event_time")

    # The other purpose has its own single version.
    results = await broker.stub.ListResourceKeyVersions(
        pb.ListResourceKeyVersionsRequest(parent="resources/r1/resourceKeys/results")
    )
    assert [(v.version, v.current) for v in results.resource_key_versions] == [(1, True)]
    assert results.next_page_token == ""

    current = (await get(broker)).encryption
    models = next(e for e in current if e.purpose == pb.MODELS)
    assert models.current_key_version == f"{parent}/versions/5"


@pytest.mark.asyncio
async def test_get_status(broker: BrokerUnderTest) -> None:
    status = await broker.stub.GetStatus(pb.GetStatusRequest())
    assert status.healthz == "ok"
    assert re.fullmatch(r"masterKeys/[0-9a-f]{32}", status.master_key_id)
    assert status.master_key_id == broker.running.broker.master.key_id
    assert not status.encryption

    await create(broker)
    status = await broker.stub.GetStatus(pb.GetStatusRequest(name="resources/r1"))
    assert status.healthz == "ok"
    assert list(status.encryption) == list((await get(broker)).encryption)
    assert len(status.encryption) == 2

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await broker.stub.GetStatus(pb.GetStatusRequest(name="resources/nope"))
    assert_error(err.value, grpc.StatusCode.NOT_FOUND, "RESOURCE_NOT_FOUND")


@pytest.mark.asyncio
async def test_every_state_change_writes_exactly_one_audit_row(broker: BrokerUnderTest) -> None:
    await create(broker)
    await broker.stub.ImportResource(
        pb.ImportResourceRequest(
            resource_id="imp", create_time=stamp(datetime(2022, 1, 1, tzinfo=UTC))
        )
    )
    rotated = await broker.stub.RotateResourceKey(
        pb.RotateResourceKeyRequest(name="resources/r1/resourceKeys/results")
    )
    v1 = "resources/r1/resourceKeys/results/versions/1"
    await broker.stub.DestroyResourceKeyVersion(pb.DestroyResourceKeyVersionRequest(name=v1))
    await broker.stub.RestoreResourceKeyVersion(pb.RestoreResourceKeyVersionRequest(name=v1))
    await broker.stub.DestroyResourceKeyVersion(pb.DestroyResourceKeyVersionRequest(name=v1))
    await broker.stub.DeleteResource(pb.DeleteResourceRequest(name="resources/imp"))
    await broker.stub.UndeleteResource(pb.UndeleteResourceRequest(name="resources/imp"))
    await broker.stub.DeleteResource(pb.DeleteResourceRequest(name="resources/imp"))
    broker.clock.advance(timedelta(days=8))
    assert await tick(broker.running.broker.lifecycle) == (1, 1, 0)

    rows = [r for r in await audit_rows(broker.engine) if r["operation"] in STATE_CHANGES]
    assert [(r["operation"], r["resource"], r["outcome"]) for r in rows] == [
        ("CreateResource", "resources/r1", "OK"),
        ("ImportResource", "resources/imp", "OK"),
        ("RotateResourceKey", "resources/r1", "OK"),
        ("DestroyResourceKeyVersion", "resources/r1", "OK"),
        ("RestoreResourceKeyVersion", "resources/r1", "OK"),
        ("DestroyResourceKeyVersion", "resources/r1", "OK"),
        ("DeleteResource", "resources/imp", "OK"),
        ("UndeleteResource", "resources/imp", "OK"),
        ("DeleteResource", "resources/imp", "OK"),
        ("DestroyResourceKeyVersionMaterial", "resources/r1", "OK"),
        ("DestroyResource", "resources/imp", "OK"),
    ]
    assert rows[0]["key_ids"] == (
        "resources/r1/resourceKeys/models/versions/1 resources/r1/resourceKeys/results/versions/1"
    )
    assert rows[2]["key_ids"] == rotated.resource_key_version.name
    assert rows[3]["key_ids"] == v1
    assert rows[9]["key_ids"] == v1
    assert all(r["caller"].startswith("ipv4:127.0.0.1") for r in rows[:9])
    assert rows[9]["caller"] == rows[10]["caller"] == "keybroker-janitor"


@asynccontextmanager
async def database_write_lock(database_url: str) -> AsyncIterator[None]:
    """Holds the database's write lock (SQLite) or the resources table (PostgreSQL) meanwhile."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        # In a thread: the broker runs on this event loop, and a lock wait that blocked the loop
        # would keep the broker from finishing the transaction it waits for.
        conn = sqlite3.connect(
            str(url.database), isolation_level=None, timeout=30, check_same_thread=False
        )
        await asyncio.to_thread(conn.execute, "BEGIN IMMEDIATE")
        try:
            yield
        finally:
            await asyncio.to_thread(conn.execute, "ROLLBACK")
            conn.close()
        return
    pg = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(False))
    try:
        async with pg.transaction():
            await pg.execute("LOCK TABLE resources IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await pg.close()


@pytest.mark.asyncio
async def test_a_state_change_whose_caller_gives_up_still_completes_and_is_audited(
    broker: BrokerUnderTest,
) -> None:
    # The deadline passes while the transaction waits for a lock: the RPC ends, the work does
    # not. It commits once the lock is released, with its audit record; nothing is left
    # half-done (a cancelled aiosqlite connection used to leave a close task that hung shutdown).
    async with database_write_lock(broker.settings.database):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await broker.stub.CreateResource(
                pb.CreateResourceRequest(resource_id="late"), timeout=0.5
            )
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await broker.running.broker.service.detached.wait_all()
    got = await broker.stub.GetResource(pb.GetResourceRequest(name="resources/late"))
    assert got.resource.state == pb.Resource.ACTIVE
    audited = [
        (r["operation"], r["outcome"])
        for r in await audit_rows(broker.engine)
        if r["resource"] == "resources/late"
    ]
    assert audited[0] == ("CreateResource", "OK")
