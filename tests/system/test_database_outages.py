"""Database outages, as an operator meets them: a real PostgreSQL stopped and started under
traffic, and a network that stops forwarding (a loopback proxy turned black hole), with broker and
workers as real processes, apart and under `keybroker up`.

What must hold: no process exits; every call that needs the database (every audited call does)
fails closed, UNAVAILABLE with a reason, within about two seconds (KEYBROKER_DATABASE_TIMEOUT,
2 s), never INTERNAL; within five seconds of the database answering again every call succeeds
with no restart; what was acknowledged reads back, and what was refused left nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from broker.api import key_broker_pb2 as pb
from broker.api import storage_pb2 as spb
from tests.pg_cluster import Cluster, private_cluster
from tests.processes import (
    ENV,
    KEY_BROKER,
    KEYBROKER,
    STORAGE,
    Process,
    check_all_intact,
    download,
    keybroker,
    small_models,
    stubs,
    succeeded,
    upload,
    upload_all,
    wait_job,
)
from tests.tcp_proxy import tcp_proxy

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]

FAIL_WITHIN = 2.5
"""Seconds a refused call may take: the 2 s database timeout, plus a loaded machine's slack."""
RECOVER_WITHIN = 5.0
"""Seconds after the database accepts connections again by which every call succeeds."""
REASONS = {"DATABASE_UNAVAILABLE", "AUDIT_UNAVAILABLE"}
MODEL = "resources/r1/models/before"
V1 = "resources/r1/resourceKeys/models/versions/1"
MODEL_DATA = os.urandom(300_000)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster of this module's own, since its tests stop it."""
    with private_cluster() as c:
        yield c


@asynccontextmanager
async def database(cluster: Cluster) -> AsyncIterator[str]:
    """A fresh database in `cluster`, migrated by `keybroker migrate`; yields its URL."""
    name = f"outage_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = cluster.url.rsplit("/", 1)[0] + f"/{name}"
    migrate = await asyncio.create_subprocess_exec(
        *KEYBROKER, "migrate", "--database-url", url, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, **ENV},
    )  # fmt: skip
    output, _ = await asyncio.wait_for(migrate.communicate(), 60)
    assert migrate.returncode == 0, output
    yield url


@dataclass
class Seen:
    call: str
    seconds: float
    code: grpc.StatusCode
    reason: str = ""


def _reason(exc: grpc.aio.AioRpcError) -> str:
    status: Any = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


class Traffic:
    """One of each kind of call that needs the database, against a broker and a Storage server
    (the same one under `keybroker up`)."""

    def __init__(self, kb: Any, storage: Any, wrapped: bytes) -> None:
        self.kb, self.storage = kb, storage
        self.uploads: dict[str, bytes] = {}
        self.acknowledged: dict[str, bytes] = {}
        decrypt = pb.DecryptDataKeyRequest(name="resources/r1/models/k", wrapped_data_key=wrapped)
        self.calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "DecryptDataKey": lambda: kb.DecryptDataKey(decrypt, timeout=20),
            "GetResource": lambda: kb.GetResource(
                pb.GetResourceRequest(name="resources/r1"), timeout=20
            ),
            "GetModel": lambda: storage.GetModel(spb.GetModelRequest(name=MODEL), timeout=20),
            "DownloadModel": lambda: download(storage, MODEL),
            "UploadModel": self._upload,
        }

    async def _upload(self) -> None:
        name = f"resources/r1/models/u{len(self.uploads)}"
        data = os.urandom(50_000)
        self.uploads[name] = data
        await upload(self.storage, name, data)
        self.acknowledged[name] = data

    async def round(self) -> list[Seen]:
        """Every call once, concurrently: what each answered and how long it took."""

        async def one(name: str, call: Callable[[], Awaitable[Any]]) -> Seen:
            start = time.monotonic()
            try:
                await asyncio.wait_for(call(), 20)
            except grpc.aio.AioRpcError as exc:
                return Seen(name, time.monotonic() - start, exc.code(), _reason(exc))
            return Seen(name, time.monotonic() - start, grpc.StatusCode.OK)

        return list(await asyncio.gather(*(one(n, c) for n, c in self.calls.items())))

    async def all_succeed_within(self, seconds: float) -> float:
        """Seconds until one round succeeds entirely; fails past `seconds`."""
        start = time.monotonic()
        while True:
            seen = await self.round()
            if all(s.code == grpc.StatusCode.OK for s in seen):
                return time.monotonic() - start
            assert time.monotonic() - start < seconds, [s for s in seen if s.code.value[0]]
            await asyncio.sleep(0.1)

    async def acknowledged_read_back(self) -> None:
        """Every acknowledged upload reads back byte for byte; every refused one is not there."""
        assert (await download(self.storage, MODEL))[1] == MODEL_DATA
        for name, data in self.uploads.items():
            if name in self.acknowledged:
                assert (await download(self.storage, name))[1] == data, name
            else:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await self.storage.GetModel(spb.GetModelRequest(name=name))
                assert err.value.code() == grpc.StatusCode.NOT_FOUND, name


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@asynccontextmanager
async def watching(port: int, service: str) -> AsyncIterator[list[int]]:
    """grpc.health.v1 Watch on `service`, for as long as the block runs: the statuses seen."""
    seen: list[int] = []
    opened = asyncio.Event()

    async def watch() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)
            async for reply in stub.Watch(health_pb2.HealthCheckRequest(service=service)):
                seen.append(reply.status)
                opened.set()  # the first status arrives as soon as the watch is open

    task = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(opened.wait(), 10)
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def answers_within(call: Callable[[], Awaitable[Any]], seconds: float) -> None:
    """`call` succeeds within `seconds` of now (UNAVAILABLE meanwhile is the outage's tail)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            await call()
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


async def prepare(kb: Any, storage: Any) -> Traffic:
    await kb.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    await upload(storage, MODEL, MODEL_DATA)
    key = await kb.GenerateDataKey(pb.GenerateDataKeyRequest(name="resources/r1/models/k"))
    traffic = Traffic(kb, storage, key.wrapped_data_key)
    await traffic.all_succeed_within(RECOVER_WITHIN)
    return traffic


async def ride_out(
    traffic: Traffic, outage: float, processes: list[Process], *, interval: float = 0.2
) -> list[Seen]:
    """Sends rounds of calls for `outage` seconds (the database is away); returns what failed.
    Every call that fails does so closed and in time; no process exits."""
    failed: list[Seen] = []
    end = time.monotonic() + outage
    while time.monotonic() < end:
        for seen in await traffic.round():
            if seen.code == grpc.StatusCode.OK:
                continue
            assert seen.code == grpc.StatusCode.UNAVAILABLE, seen
            assert seen.reason in REASONS, seen
            assert seen.seconds < FAIL_WITHIN, seen
            failed.append(seen)
        for p in processes:
            assert p.proc.returncode is None, p.output()
        await asyncio.sleep(interval)
    return failed


async def outage(
    traffic: Traffic,
    processes: list[Process],
    begin: Callable[[], None],
    end: Callable[[], None],
    *,
    seconds: float,
    interval: float = 0.2,
) -> None:
    """The database goes away (`begin`) for `seconds` under traffic (ride_out), comes back
    (`end`); then every call succeeds within RECOVER_WITHIN and what was acknowledged is there."""
    begin()
    try:
        failed = await ride_out(traffic, seconds, processes, interval=interval)
    finally:
        end()
    # Every kind of call needed the database, so every kind was refused.
    assert {s.call for s in failed} == set(traffic.calls)
    await traffic.all_succeed_within(RECOVER_WITHIN)
    await traffic.acknowledged_read_back()


async def test_broker_and_workers_apart_ride_out_postgresql_stopped_for_5s(
    cluster: Cluster, tmp_path: Path
) -> None:
    async with database(cluster) as url:
        db = ("--database-url", url)
        async with keybroker(tmp_path, "broker", tmp_path / "b", *db, service=KEY_BROKER) as b:
            address = f"127.0.0.1:{b.port}"
            async with (
                keybroker(
                    tmp_path, "workers", tmp_path / "w", *db, "--broker-address", address
                ) as w,
                stubs(b.port) as (kb, _),
                stubs(w.port) as (_, storage),
            ):
                traffic = await prepare(kb, storage)
                async with (
                    watching(b.port, KEY_BROKER) as broker_health,
                    watching(w.port, STORAGE) as workers_health,
                ):
                    cluster.stop()
                    try:
                        failed = await ride_out(traffic, 5, [b, w])
                        # The polled status still answers, from memory, and says why.
                        status = await kb.GetStatus(pb.GetStatusRequest(), timeout=2)
                        assert status.healthz == "database unavailable", status
                    finally:
                        cluster.start()
                    assert {s.call for s in failed} == set(traffic.calls)
                    await traffic.all_succeed_within(RECOVER_WITHIN)
                    await traffic.acknowledged_read_back()
                    await asyncio.sleep(0.5)
                # Health told the truth to whoever watched: serving, not serving, serving again.
                for seen in (broker_health, workers_health):
                    assert seen[:1] == [SERVING] and seen[-1] == SERVING, seen
                    assert NOT_SERVING in seen, seen
                assert await w.terminate() == 0, w.output()
            assert await b.terminate() == 0, b.output()
        # No audit record was lost or forged on the way: every chain verifies end to end.
        verify = await asyncio.create_subprocess_exec(
            *KEYBROKER, "audit", "verify", "--data-dir", str(tmp_path / "b"), *db,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **ENV},
        )  # fmt: skip
        report, _ = await asyncio.wait_for(verify.communicate(), 60)
        assert verify.returncode == 0, report.decode()


async def test_a_job_running_when_the_database_goes_away_ends_the_same_after_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A re-encrypt job caught mid-way by the outage is given back, not failed, with no attempt
    counted (its lease outlasts the outage here), and runs to the same end once the database is
    back: every object re-encrypted, readable, under the same key version."""
    models = small_models(150)
    lease = {"KEYBROKER_JOB_LEASE": "20s"}
    async with (
        database(cluster) as url,
        keybroker(tmp_path, "up", tmp_path / "up", "--database-url", url, env=lease) as up,
        stubs(up.port) as (kb, storage),
    ):
        await kb.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
        await upload_all(storage, models)
        started = (
            await storage.StartReencryptJob(spb.StartReencryptJobRequest(name="resources/r1"))
        ).job
        mid = await wait_job(storage, started.name, lambda j: j.done > 0 or succeeded(j))
        cluster.stop()
        try:
            await asyncio.sleep(3)
            assert up.proc.returncode is None, up.output()
        finally:
            cluster.start()
        await answers_within(
            lambda: storage.GetJob(spb.GetJobRequest(name=started.name)), RECOVER_WITHIN
        )
        job = await wait_job(storage, started.name, succeeded, within=60, poll=0.1)
        assert mid.state == spb.Job.RUNNING and mid.done < mid.total, f"not caught mid-way: {mid}"
        assert job.done == job.total == len(models), job
        await check_all_intact(storage, models, V1)
        assert await up.terminate() == 0, up.output()
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        row = await conn.fetchrow(
            "SELECT state, attempts FROM jobs WHERE id = $1", started.name.rsplit("/", 1)[1]
        )
    finally:
        await conn.close()
    assert (row["state"], row["attempts"]) == ("succeeded", 1), dict(row)


async def test_keybroker_up_rides_out_postgresql_stopped_for_60s(
    cluster: Cluster, tmp_path: Path
) -> None:
    async with (
        database(cluster) as url,
        keybroker(tmp_path, "up", tmp_path / "up", "--database-url", url) as up,
        stubs(up.port) as (kb, storage),
    ):
        traffic = await prepare(kb, storage)
        await outage(traffic, [up], cluster.stop, cluster.start, seconds=60, interval=2)
        assert await up.terminate() == 0, up.output()


async def test_a_database_behind_a_black_hole_is_refused_in_time_not_waited_for(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A connect or a query into a network that stopped forwarding hangs until something gives
    up: the database timeout does, for both the pool and the audit trail's own connection."""
    async with (
        database(cluster) as direct_url,
        tcp_proxy("127.0.0.1", cluster.port) as proxy,
    ):
        url = direct_url.replace(f":{cluster.port}/", f":{proxy.port}/")
        async with (
            keybroker(tmp_path, "up", tmp_path / "up", "--database-url", url) as up,
            stubs(up.port) as (kb, storage),
        ):
            traffic = await prepare(kb, storage)
            await outage(traffic, [up], proxy.blackhole, proxy.restore, seconds=6, interval=0.5)
            assert await up.terminate() == 0, up.output()
