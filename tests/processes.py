"""keybroker as real processes, for the system tests: start one on a free loopback port, wait
until it serves, stop it with SIGTERM or SIGKILL, read its log; and the Storage uploads and
downloads those tests make."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.api import key_broker_pb2_grpc as pb_grpc
from broker.api import storage_pb2 as spb
from broker.api import storage_pb2_grpc as spb_grpc
from tests.harness import free_port

KEYBROKER = [sys.executable, "-m", "broker.cli"]
STORAGE = "keybroker.v1.Storage"
KEY_BROKER = "keybroker.v1.KeyBroker"
ENV = {
    # A killed runner's lease must expire promptly: the lease is stored as an absolute time, so
    # the run that is killed must already use the short lease (the restart's setting does not
    # shorten a lease taken before).
    "KEYBROKER_JOB_LEASE": "1s",
    "KEYBROKER_JOB_POLL_INTERVAL": "50ms",
    "KEYBROKER_SHUTDOWN_GRACE": "2s",
    "KEYBROKER_LOG_LEVEL": "WARNING",
}


# -- processes ------------------------------------------------------------------------------------


class Process:
    """A keybroker subprocess whose output goes to a log file (a pipe nobody reads could fill
    up and stall it)."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path, port: int) -> None:
        self.proc = proc
        self.log = log
        self.port = port

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    async def wait(self, within: float = 30) -> int:
        return await asyncio.wait_for(self.proc.wait(), within)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def terminate(self, within: float = 15) -> int:
        """SIGTERM, then the exit code; fails if the process has not exited `within` seconds."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await self.wait(within)
        except TimeoutError:
            raise AssertionError(f"no exit {within:.0f}s after SIGTERM\n{self.output()}") from None


def _open_log(path: Path) -> IO[bytes]:
    return path.open("ab")


@asynccontextmanager
async def keybroker(
    tmp_path: Path,
    command: str,
    data_dir: Path,
    *extra: str,
    service: str = STORAGE,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Process]:
    """Runs `keybroker COMMAND` on a free loopback port until it serves `service`; kills it on
    the way out if it still runs. `env` adds to (or overrides) ENV."""
    port = free_port()
    log = tmp_path / f"{command}-{port}.log"
    with _open_log(log) as out:
        proc = await asyncio.create_subprocess_exec(
            *KEYBROKER,
            command,
            "--data-dir",
            str(data_dir),
            "--listen",
            f"127.0.0.1:{port}",
            *extra,
            stdout=out,
            stderr=out,
            env={**os.environ, **ENV, **(env or {})},
        )
    process = Process(proc, log, port)
    try:
        await wait_serving(process, service)
        yield process
    finally:
        await process.kill()


async def wait_serving(process: Process, service: str) -> None:
    deadline = time.monotonic() + 30
    async with grpc.aio.insecure_channel(f"127.0.0.1:{process.port}") as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        while True:
            assert process.proc.returncode is None, process.output()
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, f"{service} did not start\n{process.output()}"
            await asyncio.sleep(0.05)


@asynccontextmanager
async def stubs(port: int) -> AsyncIterator[tuple[Any, Any]]:
    """(KeyBroker stub, Storage stub) on one channel."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.KeyBrokerStub(channel), spb_grpc.StorageStub(channel)


# -- data -----------------------------------------------------------------------------------------


def upload_requests(
    name: str, data: bytes, chunk: int, pause: float = 0, sent: list[int] | None = None
) -> AsyncIterator[spb.UploadModelRequest]:
    async def gen() -> AsyncIterator[spb.UploadModelRequest]:
        yield spb.UploadModelRequest(header=spb.UploadModelRequest.Header(name=name))
        for i in range(0, len(data), chunk):
            yield spb.UploadModelRequest(chunk=data[i : i + chunk])
            if sent is not None:
                sent[0] += 1
            if pause:
                await asyncio.sleep(pause)

    return gen()


async def upload(storage: Any, name: str, data: bytes) -> spb.Model:
    reply: spb.UploadModelResponse = await storage.UploadModel(
        upload_requests(name, data, 64 * 1024)
    )
    return reply.model


async def download(storage: Any, name: str) -> tuple[spb.Model, bytes]:
    model, parts = spb.Model(), []
    async for message in storage.DownloadModel(spb.DownloadModelRequest(name=name)):
        if message.WhichOneof("part") == "model":
            model = message.model
        else:
            parts.append(message.chunk)
    return model, b"".join(parts)


async def bounded(calls: list[Callable[[], Awaitable[Any]]], limit: int = 32) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls))


def small_models(count: int) -> dict[str, bytes]:
    return {f"resources/r1/models/m{i:05d}": f"model {i} ".encode() * 2 for i in range(count)}


async def upload_all(storage: Any, models: dict[str, bytes]) -> None:
    await bounded([partial(upload, storage, n, d) for n, d in models.items()])


async def check_all_intact(storage: Any, models: dict[str, bytes], key_id: str) -> None:
    """Every model downloads byte for byte, and GetModel names `key_id` as its wrapping key."""

    async def check(name: str, data: bytes) -> None:
        model, got = await download(storage, name)
        assert got == data, name
        assert model.key_id == key_id, (name, model.key_id)
        got_model = (await storage.GetModel(spb.GetModelRequest(name=name))).model
        assert got_model.key_id == key_id, (name, got_model.key_id)

    await bounded([partial(check, n, d) for n, d in models.items()])


async def wait_job(
    storage: Any, name: str, until: Callable[[spb.Job], bool], within: float = 30, poll: float = 0
) -> spb.Job:
    deadline = time.monotonic() + within
    while True:
        job: spb.Job = (await storage.GetJob(spb.GetJobRequest(name=name))).job
        if until(job):
            return job
        assert job.state != spb.Job.FAILED, job
        assert time.monotonic() < deadline, f"job did not get there in time: {job}"
        await asyncio.sleep(poll)


def succeeded(job: spb.Job) -> bool:
    return job.state == spb.Job.SUCCEEDED


# -- the data directory on disk -------------------------------------------------------------------
