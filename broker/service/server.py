"""Assembling and running the broker: `build_broker(settings)` and `serve(settings, stop)`.

Nothing is connected before these are called. `serve` runs everything inside one anyio task group
in the calling task: the gRPC server (KeyBroker, grpc.health.v1, reflection), the audit group
committer, the readiness checks that drive health (the database, the master key), and the
housekeeping passes (the janitor, the customer-key probes). When `stop` is set it drains: health
turns NOT_SERVING, in-flight calls finish (up to the shutdown grace), the audit queue is flushed,
then it returns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import anyio
import grpc
from anyio.abc import TaskStatus
from grpc_health.v1 import health_pb2
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from broker.api import key_broker_pb2 as pb
from broker.api import key_broker_pb2_grpc as pb_grpc
from broker.audit.chain import checkpoint_path, open_audit_key
from broker.audit.log import AuditLog
from broker.core import data_dir_lock
from broker.core.clock import Clock, utc_now
from broker.core.errors import Unavailable
from broker.core.readiness import Readiness
from broker.core.settings import Settings
from broker.db import schema
from broker.db.availability import DatabaseAvailability
from broker.db.engine import create_engine, session_factory
from broker.keys import master_key_check
from broker.keys.customer_key_checks import CustomerKeyChecks
from broker.keys.data_keys import DataKeys
from broker.keys.key_cache import KeyCache
from broker.keys.key_store import KeyStore, UsableKey
from broker.keys.master_key import MasterKey
from broker.keys.master_key_pkcs11 import MasterKeyUnavailable
from broker.keys.master_key_setup import open_master_key
from broker.keys.roots import CustomerKeyUnavailable
from broker.lifecycle import customer_key_probes, janitor
from broker.lifecycle.customer_keys import CustomerKeys
from broker.lifecycle.resources import Lifecycle, LifecyclePolicy
from broker.providers.registry import ProviderRegistry, registry_from_settings
from broker.rpc import tls
from broker.rpc.grpc_server import add_health_and_reflection, new_grpc_server, watch_readiness
from broker.rpc.listen import add_port, refuse_taken
from broker.service.key_broker import VERSION, KeyBrokerService

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KeyBroker"].full_name


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
    availability: DatabaseAvailability
    readiness: Readiness


async def build_broker(
    settings: Settings,
    engine: AsyncEngine,
    now: Clock = utc_now,
    providers: ProviderRegistry | None = None,
) -> Broker:
    """Builds the broker over a migrated database (checks the master key against it)."""
    sessions = session_factory(engine)
    master = await open_master_key(settings, sessions)
    readiness = Readiness()
    availability = DatabaseAvailability(
        engine, timeout=settings.database_timeout.total_seconds(), readiness=readiness
    )
    audit = AuditLog(
        engine,
        availability=availability,
        max_pending=settings.audit_max_pending,
        commit_delay=settings.audit_commit_delay.total_seconds(),
        database_timeout=settings.database_timeout.total_seconds(),
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
        sessions,
        {master.key_id: master},
        cache,
        providers or registry_from_settings(settings),
        CustomerKeyChecks(now),
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
        healthz = (
            "ok" if readiness.serving else ", ".join(f"{c} unavailable" for c in readiness.failing)
        )
        return pb.GetStatusResponse(
            healthz=healthz, version=VERSION, master_key_id=master.key_id, key_cache=stats
        )

    customer_keys = CustomerKeys(
        sessions, keys, lifecycle, audit, settings.cmk_cutoff, settings.cmk_poll_interval, now
    )
    service = KeyBrokerService(
        lifecycle, customer_keys, DataKeys(keys), audit, status, keys.checks, now
    )
    return Broker(
        engine,
        sessions,
        master,
        audit,
        keys,
        lifecycle,
        customer_keys,
        service,
        availability,
        readiness,
    )


class CoServed(Protocol):
    """A front end that shares the broker's server, task group and drain: how `keybroker up`
    runs the workers in the broker's process (broker.cli.up) without the broker importing them.

    The broker calls, in order: `attach` (before its server starts), `run` (in its task group,
    once the server is started), `stop` (when draining, before the server stops taking calls),
    `drained` (after the server stopped; waits for detached work), `aclose` (after the task group
    ended, so nothing of it still runs)."""

    def attach(self, server: grpc.aio.Server, port: int, broker: Broker) -> Sequence[str]:
        """Adds its servicers to `server`; returns their full service names."""
        ...

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Its background work; reports started once running, returns soon after `stop`."""
        ...

    def stop(self) -> None:
        """Asks its background work to end."""
        ...

    async def drained(self) -> None:
        """Waits for work that outlives the calls that started it."""
        ...

    async def aclose(self) -> None:
        """Releases what it holds (channels)."""
        ...


@dataclass(frozen=True)
class Running:
    """What `serve` reports once it listens."""

    port: int
    broker: Broker


async def serve(
    settings: Settings,
    stop: anyio.Event,
    *,
    migrate: bool = False,
    now: Clock = utc_now,
    providers: ProviderRegistry | None = None,
    co_served: Sequence[CoServed] = (),
    task_status: TaskStatus[Running] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Runs the broker until `stop` is set (see the module docstring). `providers` replaces the
    root-key providers the settings configure (tests inject a test credential this way);
    `co_served` front ends share its server (see CoServed)."""
    settings.check_listen()
    if not settings.reuse_port:
        refuse_taken(settings.listen)  # before anything is migrated or created
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with data_dir_lock.locked(settings.data_dir, exclusive=False):
        await _serve(
            settings,
            stop,
            migrate=migrate,
            now=now,
            providers=providers,
            co_served=co_served,
            task_status=task_status,
        )


async def _serve(
    settings: Settings,
    stop: anyio.Event,
    *,
    migrate: bool,
    now: Clock,
    providers: ProviderRegistry | None,
    co_served: Sequence[CoServed],
    task_status: TaskStatus[Running],
) -> None:
    engine = create_engine(settings.database, timeout=settings.database_timeout.total_seconds())
    try:
        if migrate:
            await schema.upgrade(engine)
        else:
            await schema.require_current(engine)
        broker = await build_broker(settings, engine, now, providers)
        credentials = tls.listen_credentials(settings)
        server = new_grpc_server(settings, broker.audit.record, broker.availability)
        pb_grpc.add_KeyBrokerServicer_to_server(broker.service, server)
        services = [SERVICE_NAME]
        port = add_port(server, settings.listen, credentials, reuse_port=settings.reuse_port)
        for front_end in co_served:
            services.extend(front_end.attach(server, port, broker))
        health_servicer = add_health_and_reflection(server, services)
        async with anyio.create_task_group() as tg:
            await tg.start(broker.audit.run)
            await server.start()
            for front_end in co_served:
                await tg.start(front_end.run)
            for name in (*services, ""):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            watchers = anyio.CancelScope()  # ended once drained, like the janitor
            checks = [
                broker.availability.run,
                partial(master_key_check.run, broker.master, broker.readiness),
            ]
            await tg.start(
                watch_readiness, watchers, checks, broker.readiness, health_servicer, services
            )
            housekeeping = anyio.CancelScope()  # the janitor and the key probes

            async def run_housekeeping() -> None:
                with housekeeping:
                    async with anyio.create_task_group() as passes:
                        passes.start_soon(
                            janitor.run,
                            broker.lifecycle,
                            broker.customer_keys,
                            settings.janitor_interval,
                        )
                        passes.start_soon(
                            customer_key_probes.run,
                            broker.sessions,
                            broker.keys,
                            settings.cmk_probe_interval,
                        )

            tg.start_soon(run_housekeeping)
            log.info("broker listening on %s (port %d)", settings.listen, port)
            task_status.started(Running(port, broker))
            await stop.wait()
            log.info("draining: health NOT_SERVING, finishing in-flight calls")
            with anyio.CancelScope(shield=True):
                await health_servicer.enter_graceful_shutdown()
                for front_end in co_served:
                    front_end.stop()
                await server.stop(settings.shutdown_grace.total_seconds())
                await broker.service.detached.wait_all()
                for front_end in co_served:
                    await front_end.drained()
                housekeeping.cancel()
                watchers.cancel()
                broker.audit.close()  # audit.run returns once everything pending is durable
            with anyio.CancelScope(shield=True):
                await broker.keys.providers.aclose()
        for front_end in co_served:
            # Only now: their background tasks (which may call the broker) have ended.
            await front_end.aclose()
        log.info("broker stopped; %d audit records committed", broker.audit.records_committed)
    finally:
        await engine.dispose()
