"""The retention sweep's two passes (workers.retention) through a real server: a sweep cut off
after shredding is finished by the next one, and a blob that cannot be removed keeps its row
until it can. Results are made through the Storage service, expired by moving the clock."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from sqlalchemy import text

from broker.api import key_broker_pb2 as pb
from broker.api import storage_pb2 as spb
from broker.core.settings import Settings
from tests.harness import BrokerUnderTest, assert_error, running_broker
from workers import retention

MODEL = "resources/r1/models/m1"


@pytest.fixture
def storage_settings(settings: Settings) -> Settings:
    return replace(settings, segment_size=4096, sweep_interval=timedelta(hours=1))


@pytest_asyncio.fixture
async def kb(storage_settings: Settings) -> AsyncIterator[BrokerUnderTest]:
    async with running_broker(storage_settings, with_storage=True) as b:
        await b.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
        yield b


async def _chunks(header: object, data: bytes, kind: type) -> AsyncIterator[object]:
    yield kind(header=header)
    yield kind(chunk=data)


async def results(kb: BrokerUnderTest, count: int) -> dict[str, str]:
    """`count` succeeded analyze results; returns operation name -> blob key."""
    await kb.storage.UploadModel(
        _chunks(spb.UploadModelRequest.Header(name=MODEL), b"model", spb.UploadModelRequest)
    )
    names = []
    for i in range(count):
        op = (
            await kb.storage.CreateAnalyzeOperation(
                spb.CreateAnalyzeOperationRequest(
                    parent="resources/r1", model=MODEL, analyze_result_id=f"a{i}"
                )
            )
        ).operation
        await kb.storage.UploadAnalyzeResult(
            _chunks(
                spb.UploadAnalyzeResultRequest.Header(name=op.name),
                os.urandom(5000),
                spb.UploadAnalyzeResultRequest,
            )
        )
        names.append(op.name)
    async with kb.engine.connect() as conn:
        rows = await conn.execute(text("SELECT name, blob_key FROM analyze_operations"))
        return {name: key for name, key in rows if name in names}


async def rows(kb: BrokerUnderTest) -> dict[str, tuple[bool, bool]]:
    """name -> (deleted, wrapped data key still stored)."""
    async with kb.engine.connect() as conn:
        found = await conn.execute(
            text("SELECT name, deleted, wrapped_data_key FROM analyze_operations")
        )
        return {name: (bool(deleted), wrapped is not None) for name, deleted, wrapped in found}


async def pending_jobs(kb: BrokerUnderTest) -> int:
    async with kb.engine.connect() as conn:
        count: int = (
            await conn.execute(
                text("SELECT count(*) FROM jobs WHERE state IN ('pending', 'running')")
            )
        ).scalar_one()
        return count


async def sweep(kb: BrokerUnderTest) -> retention.SweepCounts:
    storage = kb.workers
    return await retention.sweep(
        storage.objects, storage.objects.blobs, storage.context.sessions, storage.audit
    )


def blob(storage_settings: Settings, key: str) -> Path:
    return storage_settings.blob_dir / key


@pytest.mark.asyncio
async def test_a_sweep_cut_off_after_shredding_is_finished_by_the_next(
    kb: BrokerUnderTest, storage_settings: Settings
) -> None:
    made = await results(kb, 3)
    kb.clock.advance(timedelta(hours=24, seconds=1))
    # Step 1 alone, as a sweep killed before step 2 leaves things.
    shredded = await retention.shred_batch(kb.workers.context.sessions, kb.clock.now())
    assert sorted(shredded) == sorted(made.items())
    assert await rows(kb) == {name: (True, False) for name in made}  # keys gone, rows kept
    assert all(blob(storage_settings, key).is_file() for key in made.values())
    assert await pending_jobs(kb) == 0  # nothing else would ever remove them
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.storage.GetAnalyzeOperation(spb.GetAnalyzeOperationRequest(name=next(iter(made))))
    assert_error(err.value, grpc.StatusCode.NOT_FOUND, "ANALYZE_RESULT_NOT_FOUND")

    counts = await sweep(kb)
    assert (counts.shredded, counts.removed) == (0, 3)
    assert await rows(kb) == {}
    assert not any(blob(storage_settings, key).exists() for key in made.values())
    again = await sweep(kb)
    assert (again.shredded, again.removed) == (0, 0)  # idempotent


@pytest.mark.asyncio
async def test_a_blob_that_cannot_be_removed_keeps_its_row_until_it_can(
    kb: BrokerUnderTest, storage_settings: Settings
) -> None:
    made = await results(kb, 2)
    stuck, free = sorted(made)
    # A key the blob store refuses (no segment may start with "."): its delete raises.
    async with kb.engine.begin() as conn:
        await conn.execute(
            text("UPDATE analyze_operations SET blob_key = 'r1/.stuck' WHERE name = :n"),
            {"n": stuck},
        )
    kb.clock.advance(timedelta(hours=24, seconds=1))

    counts = await sweep(kb)
    assert (counts.shredded, counts.removed) == (2, 1)
    assert await rows(kb) == {stuck: (True, False)}  # shredded all the same
    assert not blob(storage_settings, made[free]).exists()

    async with kb.engine.begin() as conn:
        await conn.execute(
            text("UPDATE analyze_operations SET blob_key = :k WHERE name = :n"),
            {"k": made[stuck], "n": stuck},
        )
    counts = await sweep(kb)
    assert (counts.shredded, counts.removed) == (0, 1)
    assert await rows(kb) == {}
    assert not blob(storage_settings, made[stuck]).exists()
