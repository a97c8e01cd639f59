"""An address in use is refused, never shared by accident (broker.rpc.listen).

gRPC's default (SO_REUSEPORT on) would let a second keybroker start on a taken port and take half
its connections, with another master key and database behind them. Sharing is only on purpose
(`reuse_port`), and a host name is refused when any of its addresses is taken, not bound in part.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from broker.api import key_broker_pb2 as pb
from broker.core.errors import ConfigurationError
from broker.core.settings import Settings
from broker.rpc.grpc_server import server_options
from broker.rpc.listen import add_port
from tests.harness import free_port, refusal, running_broker
from tests.processes import KEYBROKER
from tests.system.test_process import start_up, wait_serving


@contextmanager
def listening(host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """A plain socket listening on host:port (as any other program would); yields the port."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, port))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.asyncio
async def test_a_second_broker_on_a_served_address_is_refused(settings: Settings) -> None:
    async with running_broker(settings) as first:
        taken = f"127.0.0.1:{first.running.port}"
        message = await refusal(replace(settings, listen=taken))
        assert message.startswith(f"cannot listen on {taken}: ")
        assert "already in use" in message
        # The first broker still answers, alone on its port.
        await first.stub.GetStatus(pb.GetStatusRequest())


@pytest.mark.asyncio
async def test_localhost_is_refused_when_one_of_its_addresses_is_taken(
    settings: Settings,
) -> None:
    """gRPC alone would bind ::1 and serve there, beside whoever holds 127.0.0.1."""
    with listening("127.0.0.1") as port:
        message = await refusal(replace(settings, listen=f"localhost:{port}"))
    assert f"127.0.0.1 port {port} is already in use" in message


@pytest.mark.asyncio
async def test_sharing_a_port_is_possible_only_on_purpose() -> None:
    """Two servers that both ask for reuse_port share it; one that does not is refused."""
    first = grpc.aio.server(options=server_options(reuse_port=True))
    port = add_port(first, "127.0.0.1:0", None, reuse_port=True)
    await first.start()
    try:
        second = grpc.aio.server(options=server_options(reuse_port=True))
        assert add_port(second, f"127.0.0.1:{port}", None, reuse_port=True) == port
        third = grpc.aio.server(options=server_options())
        with pytest.raises(ConfigurationError, match="already in use"):
            add_port(third, f"127.0.0.1:{port}", None)
    finally:
        await first.stop(None)


@pytest.mark.asyncio
async def test_port_zero_and_a_free_port_pass_the_check() -> None:
    any_port, free_one = grpc.aio.server(options=server_options()), grpc.aio.server()
    free = free_port()
    try:
        assert add_port(any_port, "127.0.0.1:0", None) > 0
        assert add_port(free_one, f"127.0.0.1:{free}", None) == free
    finally:
        await any_port.stop(None)
        await free_one.stop(None)


def test_the_workers_have_a_default_address_of_their_own() -> None:
    defaults = Settings()
    assert defaults.workers_listen != defaults.listen


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_second_keybroker_up_exits_with_one_line_naming_the_address(
    tmp_path: Path,
) -> None:
    port = free_port()
    first = start_up(tmp_path / "one", port)
    try:
        await wait_serving(port, first)
        second = await asyncio.create_subprocess_exec(
            *KEYBROKER,
            "up",
            "--data-dir",
            str(tmp_path / "two"),
            "--listen",
            f"127.0.0.1:{port}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(second.communicate(), 60)
        stderr = err.decode()
        assert second.returncode == 2
        lines = stderr.strip().splitlines()
        assert lines == [
            f"keybroker: cannot listen on 127.0.0.1:{port}: 127.0.0.1 port {port} is already in "
            "use (another keybroker? give each process its own --listen address)"
        ], stderr
        assert first.poll() is None
    finally:
        first.terminate()
        first.communicate(timeout=30)
