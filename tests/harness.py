"""Test harness: a real broker on a loopback port, databases, a movable clock, and assertions."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, cast

import anyio
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.api import key_broker_pb2_grpc as pb_grpc
from broker.api import storage_pb2_grpc as spb_grpc
from broker.cli.up import RunningUp, serve_up
from broker.core.errors import ERROR_DOMAIN, ConfigurationError
from broker.core.settings import Settings
from broker.providers.registry import ProviderRegistry
from broker.rpc import tls
from broker.service.server import Running, serve
from workers.server import Storage

STATE_TABLES = ("resources", "key_rings", "key_versions")
KEYBROKER = Path(sys.executable).with_name("keybroker")


def free_port() -> int:
    """A loopback port nothing listens on (for servers started as subprocesses)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def run_keybroker(*args: str) -> tuple[int, str, str]:
    """Runs the installed `keybroker` command; returns (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        str(KEYBROKER), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@dataclass
class Clock:
    """A clock tests can move forward; starts at the real time."""

    current: datetime = field(default_factory=lambda: datetime.now(UTC))

    def now(self) -> datetime:
        return self.current

    def advance(self, delta: timedelta) -> None:
        self.current += delta


@dataclass
class BrokerUnderTest:
    """A running broker: its port, its internals, and a stub on a channel to it."""

    running: Running
    channel: grpc.aio.Channel
    stub: pb_grpc.KeyBrokerAsyncStub
    clock: Clock
    settings: Settings

    @property
    def engine(self) -> AsyncEngine:
        return self.running.broker.engine

    @property
    def storage(self) -> Any:
        """A Storage stub on the same channel (the server must run with_storage)."""
        return spb_grpc.StorageStub(self.channel)

    @property
    def workers(self) -> Storage:
        """The workers attached to this broker (the server must run with_storage)."""
        assert isinstance(self.running, RunningUp), "run the broker with_storage"
        return self.running.storage


async def refusal(settings: Settings) -> str:
    """Starts a broker that must refuse to start; returns its ConfigurationError's message."""
    with pytest.raises(ConfigurationError) as err:
        async with running_broker(settings):
            pass
    return str(err.value)


@asynccontextmanager
async def running_broker(
    settings: Settings,
    clock: Clock | None = None,
    *,
    migrate: bool = False,
    providers: ProviderRegistry | None = None,
    with_storage: bool = False,
    credentials: grpc.ChannelCredentials | None = None,
) -> AsyncIterator[BrokerUnderTest]:
    """Runs `serve` (with_storage: `serve_up`, the workers attached as under `keybroker up`) in a
    task of its own (its task group opens and closes there) until exit.
    `credentials`: the test's channel uses TLS with them (for a broker with mutual TLS)."""
    clock = clock or Clock()
    stop = anyio.Event()
    started: asyncio.Future[Running] = asyncio.get_running_loop().create_future()

    async def supervise() -> None:
        async with anyio.create_task_group() as tg:
            running = await tg.start(
                partial(
                    serve_up if with_storage else serve,
                    settings,
                    stop,
                    migrate=migrate,
                    now=clock.now,
                    providers=providers,
                )
            )
            started.set_result(running)

    task = asyncio.create_task(supervise())
    waiters: set[asyncio.Future[Any]] = {task, started}
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        error = task.exception()
        # serve's failures arrive wrapped in its task group's exception group: unwrap lone ones
        # so that tests see the ConfigurationError a user would see.
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if error is not None:
            raise error
        raise AssertionError("serve returned without starting")
    running = started.result()
    channel = open_channel(running.port, credentials)
    try:
        yield BrokerUnderTest(
            running, channel, cast(Any, pb_grpc.KeyBrokerStub(channel)), clock, settings
        )
    finally:
        await channel.close()
        stop.set()
        await task


def open_channel(port: int, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """A channel to a loopback server: TLS when `credentials` are given."""
    address = f"127.0.0.1:{port}"
    if credentials is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, credentials)


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    status = rpc_status.from_call(cast(grpc.Call, exc))
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def assert_error(exc: BaseException, code: grpc.StatusCode, reason: str | None = None) -> None:
    """The call failed with `code` and (when given) an ErrorInfo with `reason`."""
    assert isinstance(exc, grpc.aio.AioRpcError), exc
    assert exc.code() == code, (exc.code(), exc.details())
    info = error_info(exc)
    assert info is not None, "no ErrorInfo detail"
    assert info.domain == ERROR_DOMAIN
    if reason is not None:
        assert info.reason == reason, (info.reason, exc.details())


async def state_digest(engine: AsyncEngine) -> str:
    """A digest of every stored row but the audit trail: equal digests, nothing changed."""
    h = hashlib.sha256()
    async with engine.connect() as conn:
        for table in STATE_TABLES:
            rows = (await conn.execute(text(f"SELECT * FROM {table}"))).all()
            for row in sorted(repr(tuple(r)) for r in rows):
                h.update(row.encode())
            h.update(b"|")
    return h.hexdigest()


async def audit_rows(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM audit_records ORDER BY id"))).mappings()
        return [dict(r) for r in rows]


def client_credentials(pki: Path, client: str) -> grpc.ChannelCredentials:
    """The credentials of `client`'s certificate in a `keybroker certs init` directory."""
    return tls.channel_credentials(pki / "ca.pem", pki / f"{client}.pem", pki / f"{client}.key")


def mtls_settings(settings: Settings, pki: Path, **overrides: Any) -> Settings:
    """`settings` on mutual TLS with the files of `keybroker certs init` in `pki`: the server's
    certificate, the workers' client certificate and its policy.toml; then `overrides`."""
    values: dict[str, Any] = {
        "tls_ca": str(pki / "ca.pem"),
        "tls_cert": str(pki / "server.pem"),
        "tls_key": str(pki / "server.key"),
        "tls_client_cert": str(pki / "workers.pem"),
        "tls_client_key": str(pki / "workers.key"),
        "policy_file": str(pki / "policy.toml"),
    }
    return replace(settings, **(values | overrides))
