"""Crash recovery of the workers, as a user runs them: `keybroker up` (and `keybroker workers`)
as real processes, killed with SIGKILL mid-upload and mid-job, stopped with SIGTERM mid-job, and
restarted on the same data directory. Nothing is lost or half-visible, and jobs run to the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.api import key_broker_pb2 as pb
from broker.api import storage_pb2 as spb
from tests.harness import assert_error
from tests.processes import (
    ENV,
    KEY_BROKER,
    KEYBROKER,
    check_all_intact,
    download,
    keybroker,
    small_models,
    stubs,
    succeeded,
    upload,
    upload_all,
    upload_requests,
    wait_job,
)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]

TEMP_PREFIX = ".tmp-"  # workers.fs_blobs: a write in progress
V1 = "resources/r1/resourceKeys/models/versions/1"
V2 = "resources/r1/resourceKeys/models/versions/2"


@contextmanager
def database(data_dir: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(data_dir / "keybroker.db", timeout=30)) as conn:
        conn.row_factory = sqlite3.Row
        yield conn


def job_row(data_dir: Path, job_name: str) -> dict[str, Any]:
    with database(data_dir) as conn:
        row = conn.execute(
            "SELECT state, lease_owner, lease_expires, done, total, cursor, attempts"
            " FROM jobs WHERE id = ?",
            (job_name.removeprefix("jobs/"),),
        ).fetchone()
    assert row is not None
    return dict(row)


async def wait_row(
    data_dir: Path, job_name: str, until: Callable[[dict[str, Any]], bool], within: float = 20
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while not until(row := job_row(data_dir, job_name)):
        assert time.monotonic() < deadline, f"job did not get there in time: {row}"
        await asyncio.sleep(0.002)
    return row


def blob_files(data_dir: Path) -> tuple[set[str], list[Path]]:
    """(blob keys of the published blobs, paths of the temporaries) under data/blobs."""
    root = data_dir / "blobs"
    published, temporaries = set(), []
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory, name)
            if name.startswith(TEMP_PREFIX):
                temporaries.append(path)
            else:
                published.add(path.relative_to(root).as_posix())
    return published, temporaries


def referenced_blobs(data_dir: Path) -> tuple[set[str], set[str]]:
    """(blob keys that rows point at, blob keys that unfinished remove-blob jobs will remove)."""
    with database(data_dir) as conn:
        rows = {r[0] for r in conn.execute("SELECT blob_key FROM models")} | {
            r[0]
            for r in conn.execute("SELECT blob_key FROM analyze_operations")
            if r[0] is not None
        }
        pending = {
            json.loads(r[0]).get("blob_key", "")
            for r in conn.execute(
                "SELECT payload FROM jobs WHERE kind = 'remove-blob'"
                " AND state IN ('pending', 'running')"
            )
        }
    return rows, pending


async def wait_for(condition: Callable[[], bool], what: str, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


# -- the tests ------------------------------------------------------------------------------------


async def test_sigkill_during_uploads_loses_nothing_and_shows_nothing_half_written(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    model_a, model_b = "resources/r1/models/a", "resources/r1/models/b"
    first = os.urandom(300_000)
    big_a, big_b = os.urandom(8 << 20), os.urandom(8 << 20)
    async with keybroker(tmp_path, "up", data_dir) as up, stubs(up.port) as (kb, storage):
        await kb.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
        stored = await upload(storage, model_a, first)
        sent_a, sent_b = [0], [0]
        uploads = [
            asyncio.ensure_future(
                storage.UploadModel(upload_requests(name, data, 64 * 1024, 0.01, sent))
            )
            for name, data, sent in ((model_a, big_a, sent_a), (model_b, big_b, sent_b))
        ]

        def both_mid_stream() -> bool:
            _, temporaries = blob_files(data_dir)
            written = [p.stat().st_size for p in temporaries if p.exists()]
            return len(written) == 2 and min(written) >= 1 << 20

        # Both uploads are well under way: each has a temporary holding at least one segment.
        await wait_for(both_mid_stream, "the uploads did not reach the blob store")
        assert min(sent_a[0], sent_b[0]) >= 16 and max(sent_a[0], sent_b[0]) < 128
        up.proc.kill()
        await up.wait()
        outcomes = await asyncio.gather(*uploads, return_exceptions=True)
        assert all(isinstance(o, grpc.aio.AioRpcError) for o in outcomes), outcomes

    published, temporaries = blob_files(data_dir)
    assert len(temporaries) == 2  # the killed writes left their temporaries, nothing else
    rows, pending = referenced_blobs(data_dir)
    assert published == rows == {stored_key(data_dir, model_a)}, (published, rows)
    assert pending == set()
    # The sweep removes abandoned temporaries only once they are an hour old
    # (workers.retention passes older_than=3600; no setting changes it): age them by two hours,
    # and the restarted process's first sweep (it runs at start-up) must take them away.
    aged = time.time() - 7200
    for path in temporaries:
        os.utime(path, (aged, aged))

    async with keybroker(tmp_path, "up", data_dir) as up, stubs(up.port) as (kb, storage):
        model, got = await download(storage, model_a)
        assert got == first
        assert (model.size_bytes, model.create_time) == (len(first), stored.create_time)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await storage.GetModel(spb.GetModelRequest(name=model_b))
        assert_error(err.value, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await download(storage, model_b)
        assert_error(err.value, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
        listed = await storage.ListModels(spb.ListModelsRequest(parent="resources/r1"))
        assert [m.name for m in listed.models] == [model_a]
        await wait_for(lambda: not blob_files(data_dir)[1], "the sweep left temporaries behind")
        # The store still takes writes under the same names.
        await upload(storage, model_b, b"b after the crash")
        assert (await download(storage, model_b))[1] == b"b after the crash"
        assert await up.terminate() == 0, up.output()

    published, temporaries = blob_files(data_dir)
    rows, pending = referenced_blobs(data_dir)
    assert temporaries == []
    assert published == rows, "a blob no row references"
    assert pending == set()


def stored_key(data_dir: Path, name: str) -> str:
    with database(data_dir) as conn:
        row = conn.execute("SELECT blob_key FROM models WHERE name = ?", (name,)).fetchone()
    assert row is not None
    return str(row[0])


async def test_sigkill_during_a_rewrap_job_then_the_next_claimant_finishes_it(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    models = small_models(1500)
    async with keybroker(tmp_path, "up", data_dir) as up, stubs(up.port) as (kb, storage):
        await kb.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
        await upload_all(storage, models)
        await kb.RotateResourceKey(
            pb.RotateResourceKeyRequest(name="resources/r1/resourceKeys/models")
        )
        started = (await storage.StartRewrapJob(spb.StartRewrapJobRequest(name="resources/r1"))).job
        # Watched in the database itself: GetJob answers late while a batch is in progress (the
        # server's loop is busy re-wrapping, and on SQLite every transaction, reads included,
        # is BEGIN IMMEDIATE, so GetJob queues behind the job's writes).
        mid = await wait_row(
            data_dir, started.name, lambda r: r["done"] > 0 or r["state"] == "succeeded"
        )
        up.proc.kill()
        await up.wait()
    assert 0 < mid["done"] < mid["total"] == len(models), f"not caught mid-way: {mid}"

    killed = job_row(data_dir, started.name)
    assert killed["state"] == "running" and killed["lease_owner"], killed
    assert mid["done"] <= killed["done"] < len(models), killed

    async with keybroker(tmp_path, "up", data_dir) as up, stubs(up.port) as (kb, storage):
        job = await wait_job(storage, started.name, succeeded, within=30, poll=0.05)
        assert job.done == len(models), job
        assert job.total == len(models), f"total counts resumed objects twice: {job}"
        await check_all_intact(storage, models, V2)
        versions = await kb.ListResourceKeyVersions(
            pb.ListResourceKeyVersionsRequest(parent="resources/r1/resourceKeys/models")
        )
        states = {v.version: v.state for v in versions.resource_key_versions}
        assert states == {
            2: pb.ResourceKeyVersion.ENABLED,
            1: pb.ResourceKeyVersion.DESTROY_SCHEDULED,
        }
        assert await up.terminate() == 0, up.output()
    after = job_row(data_dir, started.name)
    assert after["attempts"] == 2 and after["lease_owner"] is None, after


async def test_sigterm_gives_the_running_job_back_and_exits_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    # Re-encryption goes one object at a time (a new data key and blob each): slow enough to
    # be caught running.
    models = small_models(150)
    async with keybroker(tmp_path, "up", data_dir) as up, stubs(up.port) as (kb, storage):
        await kb.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
        await upload_all(storage, models)
        started = (
            await storage.StartReencryptJob(spb.StartReencryptJobRequest(name="resources/r1"))
        ).job
        mid = await wait_job(storage, started.name, lambda j: j.done > 0 or succeeded(j))
        assert mid.state == spb.Job.RUNNING and mid.done < mid.total, mid
        exit_code = await up.terminate()
        assert exit_code == 0, up.output()

    released = job_row(data_dir, started.name)
    assert released["state"] == "pending", released
    assert released["lease_owner"] is None and released["lease_expires"] is None, released
    assert 0 < released["done"] < len(models), released

    async with keybroker(tmp_path, "up", data_dir) as up, stubs(up.port) as (kb, storage):
        job = await wait_job(storage, started.name, succeeded, within=30, poll=0.05)
        assert job.done == job.total == len(models), job
        await check_all_intact(storage, models, V1)
        assert await up.terminate() == 0, up.output()


async def test_standalone_workers_serve_storage_and_stop_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    migrate = await asyncio.create_subprocess_exec(
        *KEYBROKER,
        "migrate",
        "--data-dir",
        str(data_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **ENV},
    )
    output, _ = await asyncio.wait_for(migrate.communicate(), 60)
    assert migrate.returncode == 0, output
    data = os.urandom(3 << 20)
    async with (
        keybroker(tmp_path, "broker", data_dir, service=KEY_BROKER) as broker,
        keybroker(
            tmp_path, "workers", data_dir, "--broker-address", f"127.0.0.1:{broker.port}"
        ) as workers,
    ):
        async with stubs(broker.port) as (kb, _):
            await kb.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
        async with stubs(workers.port) as (_, storage):
            model = await upload(storage, "resources/r1/models/m1", data)
            assert model.key_id == V1
            assert (await download(storage, "resources/r1/models/m1"))[1] == data
        assert await workers.terminate() == 0, workers.output()
        assert await broker.terminate() == 0, broker.output()
