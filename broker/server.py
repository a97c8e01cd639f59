"""Assembling and running the broker: `build_broker(settings)` and `serve(settings, stop)`.

Nothing is connected before these are called. `serve` runs everything inside one anyio task group
in the calling task: the gRPC server (KeyBroker, grpc.health.v1, reflection), the audit group
committer and the janitor. When `stop` is set it drains: health turns NOT_SERVING, in-flight calls
finish (up to the shutdown grace), the audit queue is flushed, then it returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import grpc
from anyio.abc import TaskStatus
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from broker import certs, data_dir_lock, janitor
from broker.api import key_broker_pb2 as pb
from broker.api import key_broker_pb2_grpc as pb_grpc
from broker.audit import AuditLog
from broker.audit_chain import checkpoint_path, open_audit_key
from broker.authz import Record, authz_interceptors
from broker.cmk import CustomerKeys
from broker.data_plane import DataKeys
from broker.db import schema
from broker.db.engine import create_engine, session_factory
from broker.errors import Unavailable
from broker.interceptors import ErrorInterceptor
from broker.key_cache import KeyCache
from broker.keys import KeyStore, UsableKey
from broker.lifecycle import Lifecycle, LifecyclePolicy
from broker.limits import DeadlineInterceptor, server_options
from broker.master_key import MasterKey
from broker.master_key_pkcs11 import MasterKeyUnavailable
from broker.master_keyring import open_master_key
from broker.root_keys import CustomerKeyUnavailable, ProviderRegistry, registry_from_settings
from broker.service import VERSION, KeyBrokerService
from broker.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KeyBroker"].full_name


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Broker:
    """The assembled key plane of one process."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    master: MasterKey
    audit: AuditLog
    keys: KeyStore
    lifecycle: Lifecycle
    customer_keys: CustomerKeys
    service: KeyBrokerService


async def build_broker(
    settings: Settings,
    engine: AsyncEngine,
    now: Callable[[], datetime] = utc_now,
    providers: ProviderRegistry | None = None,
) -> Broker:
    """Builds the broker over a migrated database (checks the master key against it)."""
    sessions = session_factory(engine)
    master = await open_master_key(settings, sessions)
    audit = AuditLog(
        engine,
        max_pending=settings.audit_max_pending,
        commit_delay=settings.audit_commit_delay.total_seconds(),
    )
    audit_key = await open_audit_key(sessions, master, now())
    audit.use_key(audit_key, checkpoint_path(settings.data_dir, audit.writer))
    cache: KeyCache[tuple[str, str, int], UsableKey] = KeyCache(
        ttl=settings.cache_ttl.total_seconds(),
        max_entries=settings.cache_max_entries,
        failure_ttl=settings.cmk_failure_ttl.total_seconds(),
        # A revoked or unreachable customer key, or a master key switched off in its PKCS#11
        # token, is asked again only after failure_ttl.
        remember_failure=lambda exc: isinstance(
            exc, CustomerKeyUnavailable | Unavailable | MasterKeyUnavailable
        ),
    )
    keys = KeyStore(
        sessions, {master.key_id: master}, cache, providers or registry_from_settings(settings)
    )
    policy = LifecyclePolicy(
        rotation_period=settings.rotation_period,
        default_pending_window=settings.pending_window,
        min_pending_window=settings.min_pending_window,
        max_pending_window=settings.max_pending_window,
    )
    lifecycle = Lifecycle(sessions, keys, audit, master, policy, now)

    def status() -> pb.GetStatusResponse:
        counters = cache.counters
        stats = pb.KeyCacheStats(
            hits=counters.hits,
            misses=counters.misses,
            root_key_calls=keys.root_key_calls,
            root_key_failures=keys.root_key_failures,
            entries=len(cache),
        )
        return pb.GetStatusResponse(
            healthz="ok", version=VERSION, master_key_id=master.key_id, key_cache=stats
        )

    customer_keys = CustomerKeys(
        sessions, keys, lifecycle, audit, settings.cmk_cutoff, settings.cmk_poll_interval, now
    )
    service = KeyBrokerService(lifecycle, customer_keys, DataKeys(keys), audit, status)
    return Broker(engine, sessions, master, audit, keys, lifecycle, customer_keys, service)


def new_grpc_server(settings: Settings, record_refusal: Record) -> grpc.aio.Server:
    """A gRPC server as every keybroker process builds it: errors become statuses, calls are
    bounded in time, callers are authorized when a policy is set (`record_refusal` audits
    refusals), and messages are capped (broker.limits)."""
    return grpc.aio.server(
        interceptors=[
            ErrorInterceptor(),
            DeadlineInterceptor(
                settings.max_unary_duration.total_seconds(),
                settings.max_stream_duration.total_seconds(),
            ),
            *authz_interceptors(settings, record_refusal),
        ],
        options=server_options(),
    )


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


@dataclass(frozen=True)
class Running:
    """What `serve` reports once it listens."""

    port: int
    broker: Broker
    # The workers, when they run in the same process (keybroker up).
    storage: Any = None


async def serve(
    settings: Settings,
    stop: anyio.Event,
    *,
    migrate: bool = False,
    now: Callable[[], datetime] = utc_now,
    providers: ProviderRegistry | None = None,
    with_storage: bool = False,
    task_status: TaskStatus[Running] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Runs the broker until `stop` is set (see the module docstring). `providers` replaces the
    root-key providers the settings configure (tests inject a test credential this way)."""
    settings.check_listen()
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with data_dir_lock.locked(settings.data_dir, exclusive=False):
        await _serve(
            settings,
            stop,
            migrate=migrate,
            now=now,
            providers=providers,
            with_storage=with_storage,
            task_status=task_status,
        )


async def _serve(
    settings: Settings,
    stop: anyio.Event,
    *,
    migrate: bool,
    now: Callable[[], datetime],
    providers: ProviderRegistry | None,
    with_storage: bool,
    task_status: TaskStatus[Running],
) -> None:
    engine = create_engine(settings.database)
    try:
        if migrate:
            await schema.upgrade(engine)
        else:
            await schema.require_current(engine)
        broker = await build_broker(settings, engine, now, providers)
        credentials = certs.listen_credentials(settings)
        server = new_grpc_server(settings, broker.audit.record)
        pb_grpc.add_KeyBrokerServicer_to_server(broker.service, server)
        services = [SERVICE_NAME]
        port = certs.add_port(server, settings.listen, credentials)
        storage_stopping = anyio.Event()
        storage = None
        if with_storage:
            # keybroker up: the workers share this server, and reach the broker on this very
            # port through the stubs. Imported here: the broker does not depend on the workers.
            from workers.server import SERVICE_NAME as STORAGE_NAME
            from workers.server import build_storage, run_background
            from workers.storage_service import add_to_server

            # With TLS it presents the workers' client certificate, as `keybroker workers` would.
            own_channel = certs.broker_channel(settings, f"127.0.0.1:{port}")
            storage = build_storage(settings, engine, own_channel, now)
            # One chained trail per process: the workers' records join the broker's chains.
            storage.audit = broker.audit
            add_to_server(storage.service, server)
            services.append(STORAGE_NAME)
        health_servicer = add_health_and_reflection(server, services)
        async with anyio.create_task_group() as tg:
            await tg.start(broker.audit.run)
            await server.start()
            if storage is not None:
                await tg.start(run_background, storage, settings, storage_stopping)
            for name in (*services, ""):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            janitor_scope = anyio.CancelScope()

            async def run_janitor() -> None:
                with janitor_scope:
                    await janitor.run(
                        broker.lifecycle, broker.customer_keys, settings.janitor_interval
                    )

            tg.start_soon(run_janitor)
            log.info("broker listening on %s (port %d)", settings.listen, port)
            task_status.started(Running(port, broker, storage))
            await stop.wait()
            log.info("draining: health NOT_SERVING, finishing in-flight calls")
            with anyio.CancelScope(shield=True):
                await health_servicer.enter_graceful_shutdown()
                storage_stopping.set()  # the job runner gives its job back, the sweeper stops
                await server.stop(settings.shutdown_grace.total_seconds())
                await broker.service.detached.wait_all()
                if storage is not None:
                    await storage.objects.detached.wait_all()
                janitor_scope.cancel()
                broker.audit.close()  # audit.run returns once everything pending is durable
            with anyio.CancelScope(shield=True):
                await broker.keys.providers.aclose()
        if storage is not None:
            # Only now: the workers' background tasks (which call the broker) have ended.
            await own_channel.close()
        log.info("broker stopped; %d audit records committed", broker.audit.records_committed)
    finally:
        await engine.dispose()
