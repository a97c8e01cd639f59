"""`keybroker up`: the broker and the workers in one process, on one port.

The workers attach to the broker's server as a co-served front end (broker.service.server.CoServed):
Storage is served beside KeyBroker, and reaches the broker on that very port through the
generated stubs, as a standalone `keybroker workers` would over the network (with TLS it presents
the workers' client certificate). Its audit records join the broker's own chained trail. This is
the composition root's business: neither the broker nor the workers import each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import grpc
from anyio.abc import TaskStatus

from broker.core.clock import Clock, utc_now
from broker.core.settings import Settings
from broker.providers.registry import ProviderRegistry
from broker.rpc import tls
from broker.service.server import Broker, Running, serve
from workers.server import SERVICE_NAME as STORAGE_NAME
from workers.server import Storage, build_storage, run_background
from workers.storage_service import add_to_server


@dataclass(frozen=True)
class RunningUp(Running):
    """What `serve_up` reports once it listens: the broker's Running and the workers."""

    storage: Storage


class InProcessWorkers:
    """The workers as a front end of the broker's own server (see the module docstring)."""

    def __init__(self, settings: Settings, now: Clock) -> None:
        self._settings = settings
        self._now = now
        self._stopping = anyio.Event()
        self._channel: grpc.aio.Channel | None = None
        self.storage: Storage | None = None

    def attach(self, server: grpc.aio.Server, port: int, broker: Broker) -> Sequence[str]:
        self._channel = tls.broker_channel(self._settings, f"127.0.0.1:{port}")
        storage = build_storage(self._settings, broker.engine, self._channel, self._now)
        # One chained trail per process: the workers' records join the broker's chains.
        storage.audit = broker.audit
        add_to_server(storage.service, server)
        self.storage = storage
        return [STORAGE_NAME]

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        assert self.storage is not None, "attach first"
        await run_background(self.storage, self._settings, self._stopping, task_status=task_status)

    def stop(self) -> None:
        self._stopping.set()  # the job runner gives its job back, the sweeper stops

    async def drained(self) -> None:
        if self.storage is not None:
            await self.storage.objects.detached.wait_all()

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()


async def serve_up(
    settings: Settings,
    stop: anyio.Event,
    *,
    migrate: bool = False,
    now: Clock = utc_now,
    providers: ProviderRegistry | None = None,
    task_status: TaskStatus[RunningUp] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Runs the broker with the workers attached until `stop` is set (see
    broker.service.server.serve)."""
    workers = InProcessWorkers(settings, now)
    async with anyio.create_task_group() as tg:
        running: Running = await tg.start(
            lambda task_status: serve(
                settings,
                stop,
                migrate=migrate,
                now=now,
                providers=providers,
                co_served=[workers],
                task_status=task_status,
            )
        )
        assert workers.storage is not None
        task_status.started(RunningUp(running.port, running.broker, workers.storage))
