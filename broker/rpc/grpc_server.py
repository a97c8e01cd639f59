"""One place builds a keybroker gRPC server: its interceptors, its message limits, and the
grpc.health.v1 and reflection services every server offers beside its own."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio
import grpc
from anyio.abc import TaskStatus
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from broker.core.limits import MAX_MESSAGE_BYTES
from broker.core.readiness import Readiness
from broker.core.settings import Settings
from broker.db.availability import DatabaseAvailability
from broker.rpc.authz import Record, authz_interceptors
from broker.rpc.deadlines import DeadlineInterceptor
from broker.rpc.interceptors import ErrorInterceptor


def server_options(*, reuse_port: bool = False) -> list[tuple[str, Any]]:
    """The gRPC server options every keybroker server is built with. SO_REUSEPORT only when
    asked for (broker.rpc.listen): gRPC's default would share a taken port silently."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", int(reuse_port)),
    ]


def new_grpc_server(
    settings: Settings, record_refusal: Record, availability: DatabaseAvailability | None = None
) -> grpc.aio.Server:
    """A gRPC server as every keybroker process builds it: errors become statuses (and, with
    `availability`, calls are refused at once while the database is down), calls are bounded in
    time (broker.rpc.deadlines), callers are authorized when a policy is set (`record_refusal`
    audits refusals), and messages are capped (broker.core.limits)."""
    return grpc.aio.server(
        interceptors=[
            ErrorInterceptor(availability),
            DeadlineInterceptor(
                settings.max_unary_duration.total_seconds(),
                settings.max_stream_duration.total_seconds(),
            ),
            *authz_interceptors(settings, record_refusal),
        ],
        options=server_options(reuse_port=settings.reuse_port),
    )


async def follow_readiness(
    health_servicer: health.aio.HealthServicer,
    services: Sequence[str],
    readiness: Readiness,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Keeps grpc.health.v1 in step with the process's readiness until cancelled: every service
    (and the server as a whole) NOT_SERVING while a condition fails (the database, the master
    key), SERVING again once none does. Watch streams see both changes."""
    task_status.started()
    while True:
        available = await readiness.changed()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if available
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in (*services, ""):
            await health_servicer.set(name, status)


async def watch_readiness(
    scope: anyio.CancelScope,
    checks: Sequence[Callable[..., Coroutine[Any, Any, None]]],
    readiness: Readiness,
    health_servicer: health.aio.HealthServicer,
    services: Sequence[str],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The background checks that keep `readiness` up to date (each started with task_status)
    and the health they drive (follow_readiness), until `scope` is cancelled (a server cancels
    it once drained)."""
    with scope:
        async with anyio.create_task_group() as tg:
            for check in checks:
                await tg.start(check)
            await tg.start(follow_readiness, health_servicer, services, readiness)
            task_status.started()


def add_health_and_reflection(
    server: grpc.aio.Server, services: Sequence[str]
) -> health.aio.HealthServicer:
    """Adds grpc.health.v1 and reflection (of `services` and themselves) to `server`; returns
    the health servicer, to be set SERVING once the server is."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return health_servicer
