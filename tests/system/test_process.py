"""The `keybroker` processes as a user runs them: serve, drain on SIGTERM, refuse bad set-ups."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.api import key_broker_pb2 as pb
from broker.api import key_broker_pb2_grpc as pb_grpc
from tests.harness import free_port
from tests.processes import KEYBROKER


def start_up(data_dir: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*KEYBROKER, "up", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def wait_serving(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service="keybroker.v1.KeyBroker")
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, "broker did not start serving"
            await asyncio.sleep(0.1)


@pytest.mark.asyncio
async def test_up_serves_then_drains_on_sigterm_and_restarts_on_the_same_data(
    tmp_path: Path,
) -> None:
    data_dir, port = tmp_path / "data", free_port()
    proc = start_up(data_dir, port)
    try:
        await wait_serving(port, proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub: Any = pb_grpc.KeyBrokerStub(channel)
            await stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
            key = await stub.GenerateDataKey(
                pb.GenerateDataKeyRequest(name="resources/r1/models/m1")
            )
            # Calls in flight when SIGTERM arrives are answered, and audited, before the exit.
            calls = [
                asyncio.ensure_future(
                    stub.DecryptDataKey(
                        pb.DecryptDataKeyRequest(
                            name="resources/r1/models/m1", wrapped_data_key=key.wrapped_data_key
                        )
                    )
                )
                for _ in range(50)
            ]
            await asyncio.sleep(0)
            proc.send_signal(signal.SIGTERM)
            replies = await asyncio.gather(*calls, return_exceptions=True)
        answered = [r for r in replies if not isinstance(r, BaseException)]
        refused = [r for r in replies if isinstance(r, grpc.aio.AioRpcError)]
        assert len(answered) + len(refused) == 50
        assert all(r.plaintext_data_key == key.plaintext_data_key for r in answered)
        # Calls that had not reached the server before shutdown began are refused, not dropped.
        assert {r.code() for r in refused} <= {
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.CANCELLED,
        }
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, output
        assert "draining" in output
        # Create and Generate were audited in their own transaction / group; every answered
        # decrypt has its record in the trail before the process exits.
        assert f"{len(answered) + 1} audit records committed" in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert (data_dir / "master.key").stat().st_mode & 0o777 == 0o600
    assert (data_dir / "keybroker.db").stat().st_mode & 0o077 == 0
    # Restart on the same data directory: the key from before still decrypts.
    proc = start_up(data_dir, port)
    try:
        await wait_serving(port, proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.KeyBrokerStub(channel)
            reply = await stub.DecryptDataKey(
                pb.DecryptDataKeyRequest(
                    name="resources/r1/models/m1", wrapped_data_key=key.wrapped_data_key
                )
            )
            assert reply.plaintext_data_key == key.plaintext_data_key
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KEYBROKER, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_a_non_loopback_address_is_refused(tmp_path: Path) -> None:
    result = run_cli("up", "--data-dir", str(tmp_path / "d"), "--listen", "0.0.0.0:0")
    assert result.returncode == 2
    assert "only loopback addresses are allowed" in result.stderr
    assert not (tmp_path / "d").exists()


def test_broker_refuses_an_unmigrated_database_and_names_the_command(tmp_path: Path) -> None:
    result = run_cli("broker", "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert "run `keybroker migrate` first" in result.stderr


def test_settings_come_from_environment_and_flags_win(tmp_path: Path) -> None:
    env = dict(os.environ, KEYBROKER_LISTEN="10.1.2.3:1", KEYBROKER_DATA_DIR=str(tmp_path / "e"))
    from_env = run_cli("up", env=env)
    assert from_env.returncode == 2
    assert "refusing to listen on 10.1.2.3" in from_env.stderr
    bad_duration = run_cli("up", env=dict(os.environ, KEYBROKER_CACHE_TTL="soon"))
    assert bad_duration.returncode == 2
    assert "not a duration" in bad_duration.stderr


def test_admin_client_reports_status_and_reason(tmp_path: Path) -> None:
    port = free_port()
    proc = start_up(tmp_path / "data", port)
    try:
        asyncio.run(wait_serving(port, proc))
        address = f"127.0.0.1:{port}"
        created = run_cli("resources", "create", "r1", "--address", address)
        assert created.returncode == 0, created.stderr
        assert '"name": "resources/r1"' in created.stdout
        missing = run_cli("resources", "get", "resources/r2", "--address", address)
        assert missing.returncode == 1
        assert "NOT_FOUND" in missing.stderr
        assert "RESOURCE_NOT_FOUND" in missing.stderr
        listed = run_cli("resources", "list", "--address", address)
        assert listed.stdout.startswith("resources/r1\tACTIVE")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
