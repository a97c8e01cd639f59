"""Assembling and running the workers: the Storage service, the retention sweeper and the job
runner, in one anyio task group per process.

`keybroker workers` runs them with a gRPC server of their own and reaches the broker at
`broker_address`; `keybroker up` attaches them to the broker's server (broker.service.server), and
Storage reaches the broker on that same port through the generated stubs.
With TLS settings both the server and the channel to the broker use mutual TLS (broker.rpc.tls):
the workers present their own client certificate, and with a policy file Storage's callers are
authorized by broker.rpc.authz (refusals audited: `_record_denial`).

Audit records (retention, refusals) go through `Storage.audit`, an AuditRecorder
(workers.audit_recorder): the broker's AuditLog under `keybroker up`, else the broker over gRPC
(WriteAuditRecord), so they join the broker's chained trail; the workers never hold the master
key.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial

import anyio
import grpc
from anyio.abc import TaskStatus
from grpc_health.v1 import health_pb2
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.api import storage_pb2 as spb
from broker.core.audit_event import AuditEvent
from broker.core.errors import ConfigurationError
from broker.core.readiness import Readiness
from broker.core.settings import Settings
from broker.db import schema
from broker.db.availability import DatabaseAvailability
from broker.db.engine import create_engine, is_postgresql, session_factory
from broker.rpc import tls
from broker.rpc.grpc_server import add_health_and_reflection, new_grpc_server, watch_readiness
from broker.rpc.listen import add_port, refuse_taken
from workers import retention
from workers.audit_recorder import AuditRecorder, BrokerAuditRecorder
from workers.broker_client import BrokerClient
from workers.fs_blobs import filesystem_blob_store
from workers.job_handlers import JobContext
from workers.jobs import JobQueue
from workers.objects import ObjectStore
from workers.runner import run_jobs
from workers.storage_service import StorageService, add_to_server

log = logging.getLogger(__name__)

SERVICE_NAME = spb.DESCRIPTOR.services_by_name["Storage"].full_name


@dataclass
class Storage:
    """The assembled data plane of one process."""

    objects: ObjectStore
    queue: JobQueue
    service: StorageService
    context: JobContext
    # The broker over gRPC; `keybroker up` puts the broker's own AuditLog here.
    audit: AuditRecorder


def build_storage(
    settings: Settings,
    engine: AsyncEngine,
    broker_channel: grpc.aio.Channel,
    now: Callable[[], datetime],
) -> Storage:
    """Builds the workers over a migrated database and a channel to the broker."""
    sessions = session_factory(engine)
    settings.blob_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    blobs = filesystem_blob_store(settings.blob_dir)
    broker = BrokerClient(broker_channel, settings.broker_deadline.total_seconds())
    objects = ObjectStore(
        sessions, blobs, broker, settings.segment_size, settings.result_retention, now
    )
    owner = f"{socket.gethostname()[:32]}:{os.getpid()}:{os.urandom(3).hex()}"
    queue = JobQueue(sessions, owner, settings.job_lease, now, skip_locked=is_postgresql(engine))
    service = StorageService(objects, queue, sessions, now)
    context = JobContext(sessions, objects, broker)
    return Storage(objects, queue, service, context, BrokerAuditRecorder(broker))


async def run_background(
    storage: Storage,
    settings: Settings,
    stopping: anyio.Event,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The job runner and the retention sweeper, until `stopping` is set (the runner gives its
    current job back; the sweeper is cancelled between sweeps)."""
    async with anyio.create_task_group() as tg:
        await tg.start(
            lambda task_status: run_jobs(
                storage.queue,
                storage.context,
                lease=settings.job_lease,
                poll=settings.job_poll_interval,
                stopping=stopping,
                task_status=task_status,
            )
        )
        sweeper = anyio.CancelScope()

        async def sweep_forever() -> None:
            with sweeper:
                await retention.run(
                    storage.objects,
                    storage.objects.blobs,
                    storage.context.sessions,
                    storage.audit,
                    settings.sweep_interval,
                )

        tg.start_soon(sweep_forever)
        task_status.started()
        await stopping.wait()
        sweeper.cancel()


async def _record_denial(storage: Storage, event: AuditEvent) -> None:
    # Read at each refusal, not bound once: `storage.audit` is whichever recorder the process
    # assembled. If the broker cannot take the record, the refused call fails UNAVAILABLE.
    await storage.audit.record(event)


@dataclass(frozen=True)
class RunningWorkers:
    port: int
    storage: Storage


async def serve_workers(
    settings: Settings,
    stop: anyio.Event,
    *,
    now: Callable[[], datetime],
    task_status: TaskStatus[RunningWorkers] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """`keybroker workers`: Storage on its own server, the broker at `broker_address`."""
    settings.check_listen()
    if not settings.reuse_port:
        refuse_taken(settings.listen)  # before anything is opened
    if not settings.broker_address:
        raise ConfigurationError("set --broker-address (or KEYBROKER_BROKER_ADDRESS)")
    engine = create_engine(settings.database, timeout=settings.database_timeout.total_seconds())
    try:
        await schema.require_current(engine)
        credentials = tls.listen_credentials(settings)
        async with tls.broker_channel(settings, settings.broker_address) as channel:
            storage = build_storage(settings, engine, channel, now)
            readiness = Readiness()
            availability = DatabaseAvailability(
                engine, timeout=settings.database_timeout.total_seconds(), readiness=readiness
            )
            server = new_grpc_server(settings, partial(_record_denial, storage), availability)
            add_to_server(storage.service, server)
            health_servicer = add_health_and_reflection(server, [SERVICE_NAME])
            port = add_port(server, settings.listen, credentials, reuse_port=settings.reuse_port)
            stopping = anyio.Event()
            async with anyio.create_task_group() as tg:
                await server.start()
                await tg.start(run_background, storage, settings, stopping)
                for name in (SERVICE_NAME, ""):
                    await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
                watchers = anyio.CancelScope()
                await tg.start(
                    watch_readiness,
                    watchers,
                    [availability.run],
                    readiness,
                    health_servicer,
                    [SERVICE_NAME],
                )
                log.info("workers listening on %s (port %d)", settings.listen, port)
                task_status.started(RunningWorkers(port, storage))
                await stop.wait()
                with anyio.CancelScope(shield=True):
                    await health_servicer.enter_graceful_shutdown()
                    stopping.set()
                    await server.stop(settings.shutdown_grace.total_seconds())
                    await storage.objects.detached.wait_all()
                    watchers.cancel()
    finally:
        await engine.dispose()
