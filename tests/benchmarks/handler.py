"""The broker's own cost per data-key call, without gRPC: the KeyBroker handlers called directly.

Runs the real service (real SQLite in a temporary directory, audit group commit on) in this process
and calls DecryptDataKey / GenerateDataKey through the same handler entry point gRPC uses, from 1
and 64 concurrent tasks. CPU time per call (process time, so the audit writer thread counts) is the
figure to set beside gRPC's own per-call server CPU from the unary benchmark.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from broker.api import key_broker_pb2 as pb
from broker.core.settings import Settings
from broker.db import schema
from broker.db.engine import create_engine
from broker.service.server import build_broker

NAME = "resources/bench/models/m1"


class CallContext:
    """What the handlers read from a grpc.aio ServicerContext: metadata and peer."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("user-agent", "bench"),)

    def peer_identities(self) -> None:
        return None  # plain loopback TCP: no client certificate

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


@dataclass
class HandlerFigures:
    case: str
    concurrency: int
    calls: int
    cpu_us_per_call: float
    wall_us_per_call: float


async def run(calls_per_task: int) -> list[HandlerFigures]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), database_url=f"sqlite+aiosqlite:///{tmp}/kb.db")
        engine = create_engine(settings.database)
        await schema.upgrade(engine)
        broker = await build_broker(settings, engine)
        service, ctx = broker.service, CallContext()
        results: list[HandlerFigures] = []
        async with anyio.create_task_group() as tg:
            await tg.start(broker.audit.run)
            await service.CreateResource(pb.CreateResourceRequest(resource_id="bench"), ctx)  # type: ignore[arg-type]
            key = await service.GenerateDataKey(pb.GenerateDataKeyRequest(name=NAME), ctx)  # type: ignore[arg-type]
            requests: dict[str, tuple[Any, Any]] = {
                "DecryptDataKey": (
                    service.DecryptDataKey,
                    pb.DecryptDataKeyRequest(name=NAME, wrapped_data_key=key.wrapped_data_key),
                ),
                "GenerateDataKey": (service.GenerateDataKey, pb.GenerateDataKeyRequest(name=NAME)),
            }
            for concurrency in (1, 64):
                for case, (method, request) in requests.items():
                    n = (
                        max(1, calls_per_task // concurrency)
                        if concurrency == 1
                        else calls_per_task // 8
                    )

                    async def caller(
                        method: Any = method, request: Any = request, n: int = n
                    ) -> None:
                        for _ in range(n):
                            await method(request, ctx)

                    cpu0, wall0 = time.process_time(), time.perf_counter()
                    await asyncio.gather(*(caller() for _ in range(concurrency)))
                    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                    total = n * concurrency
                    results.append(
                        HandlerFigures(
                            case, concurrency, total, cpu / total * 1e6, wall / total * 1e6
                        )
                    )
            broker.audit.close()
        await engine.dispose()
        return results
