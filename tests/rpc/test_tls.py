"""Mutual TLS on real servers (port 0) with certificates made by broker.rpc.tls: no certificate, or
one from another CA, never reaches a handler; the identity in the audit trail is the SAN URI;
the workers reach the broker over mTLS (in one process, and as a process of their own); the
start-up refusals; and `keybroker certs init`."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from broker.api import key_broker_pb2 as pb
from broker.api import key_broker_pb2_grpc as pb_grpc
from broker.api import storage_pb2 as spb
from broker.api import storage_pb2_grpc as spb_grpc
from broker.cli import dev_certs
from broker.core.clock import utc_now
from broker.core.settings import Settings
from broker.rpc import tls
from tests.harness import (
    BrokerUnderTest,
    audit_rows,
    client_credentials,
    mtls_settings,
    open_channel,
    refusal,
    run_keybroker,
    running_broker,
)
from workers.server import RunningWorkers, serve_workers

CLIENTS = ("admin", "workers", "app", "auditor")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A development CA, server and client certificates and policy, as `certs init` makes them."""
    directory = tmp_path_factory.mktemp("pki") / "certs"
    dev_certs.init_dev_certs(directory, CLIENTS)
    return directory


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA, with a client certificate of the same SAN URI as the real admin."""
    directory = tmp_path_factory.mktemp("other-pki") / "certs"
    dev_certs.init_dev_certs(directory, ("admin",))
    return directory


def tls_settings(settings: Settings, pki: Path, **overrides: Any) -> Settings:
    defaults: dict[str, Any] = {
        "segment_size": 4096,
        "job_poll_interval": timedelta(milliseconds=50),
    }
    return mtls_settings(settings, pki, **(defaults | overrides))


@pytest_asyncio.fixture
async def tls_broker(settings: Settings, pki: Path) -> AsyncIterator[BrokerUnderTest]:
    async with running_broker(
        tls_settings(settings, pki), with_storage=True, credentials=client_credentials(pki, "admin")
    ) as b:
        yield b


@pytest.mark.asyncio
async def test_a_caller_without_a_client_certificate_never_reaches_a_handler(
    tls_broker: BrokerUnderTest, pki: Path
) -> None:
    before = await audit_rows(tls_broker.engine)
    no_cert = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
    async with open_channel(tls_broker.running.port, no_cert) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.KeyBrokerStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await spb_grpc.StorageStub(channel).GetModel(
                spb.GetModelRequest(name="resources/r1/models/m"), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # Plain TCP to a TLS port fails the same way.
    async with open_channel(tls_broker.running.port) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.KeyBrokerStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await audit_rows(tls_broker.engine) == before


@pytest.mark.asyncio
async def test_a_certificate_from_another_ca_is_refused(
    tls_broker: BrokerUnderTest, pki: Path, other_pki: Path
) -> None:
    before = await audit_rows(tls_broker.engine)
    # Trusts the right server CA, but presents an admin certificate the broker's CA never issued.
    forged = tls.channel_credentials(
        pki / "ca.pem", other_pki / "admin.pem", other_pki / "admin.key"
    )
    async with open_channel(tls_broker.running.port, forged) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.KeyBrokerStub(channel).CreateResource(
                pb.CreateResourceRequest(resource_id="forged"), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # And a client that trusts another CA does not accept the broker's server certificate.
    stranger = client_credentials(other_pki, "admin")
    async with open_channel(tls_broker.running.port, stranger) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.KeyBrokerStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await audit_rows(tls_broker.engine) == before


@pytest.mark.asyncio
async def test_the_audited_identity_is_the_certificates_san_uri(
    tls_broker: BrokerUnderTest, pki: Path
) -> None:
    await tls_broker.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    async with open_channel(tls_broker.running.port, client_credentials(pki, "app")) as channel:
        await pb_grpc.KeyBrokerStub(channel).GenerateDataKey(
            pb.GenerateDataKeyRequest(name="resources/r1/models/m1")
        )
    rows = await audit_rows(tls_broker.engine)
    by_operation = {r["operation"]: r for r in rows}
    assert by_operation["CreateResource"]["caller"] == dev_certs.spiffe_id("admin")
    assert by_operation["GenerateDataKey"]["caller"] == dev_certs.spiffe_id("app")
    assert all(not r["caller"].startswith("ipv") for r in rows)


def upload_requests(name: str, data: bytes) -> Any:
    async def gen() -> AsyncIterator[spb.UploadModelRequest]:
        yield spb.UploadModelRequest(header=spb.UploadModelRequest.Header(name=name))
        for i in range(0, len(data), 1000):
            yield spb.UploadModelRequest(chunk=data[i : i + 1000])

    return gen()


async def round_trip(storage: Any, name: str, data: bytes) -> bytes:
    await storage.UploadModel(upload_requests(name, data))
    parts = []
    async for message in storage.DownloadModel(spb.DownloadModelRequest(name=name)):
        if message.WhichOneof("part") == "chunk":
            parts.append(message.chunk)
    return b"".join(parts)


@pytest.mark.asyncio
async def test_storage_in_the_broker_process_calls_the_broker_over_mtls(
    tls_broker: BrokerUnderTest, pki: Path
) -> None:
    await tls_broker.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    data = bytes(range(256)) * 40
    async with open_channel(tls_broker.running.port, client_credentials(pki, "app")) as channel:
        assert await round_trip(spb_grpc.StorageStub(channel), "resources/r1/models/m1", data) == (
            data
        )
    rows = await audit_rows(tls_broker.engine)
    keys = [r for r in rows if r["operation"] in ("GenerateDataKey", "DecryptDataKey")]
    assert {r["operation"] for r in keys} == {"GenerateDataKey", "DecryptDataKey"}
    # The broker saw the workers' certificate; the end caller is the app's, as Storage saw it.
    assert {r["caller"] for r in keys} == {dev_certs.spiffe_id("workers")}
    assert {r["on_behalf_of"] for r in keys} == {dev_certs.spiffe_id("app")}


@pytest.mark.asyncio
async def test_a_workers_process_reaches_the_broker_over_mtls(
    tls_broker: BrokerUnderTest, pki: Path
) -> None:
    await tls_broker.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    settings = replace(tls_broker.settings, broker_address=f"127.0.0.1:{tls_broker.running.port}")
    stop = anyio.Event()
    started: asyncio.Future[RunningWorkers] = asyncio.get_running_loop().create_future()

    async def supervise() -> None:
        async with anyio.create_task_group() as tg:
            started.set_result(await tg.start(partial(serve_workers, settings, stop, now=utc_now)))

    task = asyncio.create_task(supervise())
    waiters: set[asyncio.Future[Any]] = {task, started}
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    try:
        workers = started.result()
        data = b"model bytes " * 500
        async with open_channel(workers.port, client_credentials(pki, "app")) as channel:
            storage = spb_grpc.StorageStub(channel)
            assert await round_trip(storage, "resources/r1/models/m2", data) == data
        async with open_channel(workers.port) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await spb_grpc.StorageStub(plain).GetModel(
                    spb.GetModelRequest(name="resources/r1/models/m2"), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop.set()
        await task
    rows = await audit_rows(tls_broker.engine)
    generated = [r for r in rows if r["operation"] == "GenerateDataKey"]
    assert [r["caller"] for r in generated] == [dev_certs.spiffe_id("workers")]


@pytest.mark.asyncio
async def test_refusals_at_start(settings: Settings, pki: Path) -> None:
    message = await refusal(replace(settings, listen="0.0.0.0:0"))
    assert "only loopback" in message
    message = await refusal(tls_settings(settings, pki, tls_key=""))
    assert "all of --tls-ca, --tls-cert and --tls-key" in message
    message = await refusal(tls_settings(settings, pki, policy_file=""))
    assert "KEYBROKER_AUTHZ_ALLOW_ALL" in message
    message = await refusal(replace(settings, policy_file=str(pki / "policy.toml")))
    assert "needs mutual TLS" in message
    message = await refusal(tls_settings(settings, pki, tls_cert=str(pki / "missing.pem")))
    assert "cannot read the TLS certificate" in message
    # With TLS a non-loopback address is allowed (it is only checked here, not bound).
    tls_settings(settings, pki, listen="0.0.0.0:0").check_listen()


@pytest.mark.asyncio
async def test_explicit_allow_all_lets_every_certificate_in(settings: Settings, pki: Path) -> None:
    open_settings = tls_settings(settings, pki, policy_file="", authz_allow_all=True)
    async with running_broker(open_settings, credentials=client_credentials(pki, "auditor")) as b:
        await b.stub.CreateResource(pb.CreateResourceRequest(resource_id="r9"))
        rows = await audit_rows(b.engine)
        assert rows[-1]["caller"] == dev_certs.spiffe_id("auditor")
        assert rows[-1]["outcome"] == "OK"


@pytest.mark.asyncio
async def test_certs_init_writes_keys_for_this_user_alone(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    code, out, err = await run_keybroker("certs", "init", "--dir", str(directory))
    assert code == 0, err
    assert "PRIVATE KEY" not in out + err
    names = {p.name for p in directory.iterdir()}
    expected = {f"{n}{ext}" for n in ("ca", "server", *CLIENTS) for ext in (".pem", ".key")}
    assert names == expected | {"policy.toml"}
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    for name in ("ca", "server", *CLIENTS):
        key_path = directory / f"{name}.key"
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        key = load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"
        cert = x509.load_pem_x509_certificate((directory / f"{name}.pem").read_bytes())
        assert cert.public_key() == key.public_key()
        cert.verify_directly_issued_by(ca)
    server = x509.load_pem_x509_certificate((directory / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert "127.0.0.1" in [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    app = x509.load_pem_x509_certificate((directory / "app.pem").read_bytes())
    san = app.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://keybroker.local/app"
    ]
    # Never overwrites: a second run is refused and leaves the CA as it was.
    before = (directory / "ca.key").read_bytes()
    code, _, err = await run_keybroker("certs", "init", "--dir", str(directory))
    assert code == 2 and "never overwrites" in err
    assert (directory / "ca.key").read_bytes() == before


@pytest.mark.asyncio
async def test_cli_client_commands_use_tls(tls_broker: BrokerUnderTest, pki: Path) -> None:
    address = f"127.0.0.1:{tls_broker.running.port}"
    tls = ("--address", address, "--tls", "--certs-dir", str(pki))
    code, out, err = await run_keybroker("resources", "create", "cli1", *tls)
    assert code == 0, err
    assert '"name": "resources/cli1"' in out
    code, _, err = await run_keybroker("resources", "create", "cli2", *tls, "--tls-identity", "app")
    assert code == 1
    assert "PERMISSION_DENIED" in err and "(reason PERMISSION_DENIED)" in err
    code, _, err = await run_keybroker("status", "--address", address)
    assert code == 1 and "UNAVAILABLE" in err
