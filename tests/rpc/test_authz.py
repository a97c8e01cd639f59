"""Authorization on real mTLS servers (port 0): each role allowed and refused on a representative
RPC of each group of both services, resource-limited grants, an unmapped method, the audit record
of every refusal, and the policy file's checks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.api import key_broker_pb2 as pb
from broker.api import key_broker_pb2_grpc as pb_grpc
from broker.api import storage_pb2 as spb
from broker.api import storage_pb2_grpc as spb_grpc
from broker.cli import dev_certs
from broker.core.audit_event import AuditEvent
from broker.core.errors import ConfigurationError
from broker.core.settings import Settings
from broker.rpc import tls
from broker.rpc.authz import METHOD_RULES, AuthzInterceptor
from broker.rpc.interceptors import ErrorInterceptor
from broker.rpc.policy import ADMIN, AUDITOR, DATA_PLANE, load_policy, parse_policy
from tests.harness import (
    BrokerUnderTest,
    assert_error,
    audit_rows,
    client_credentials,
    mtls_settings,
    open_channel,
    refusal,
    running_broker,
    state_digest,
)

CLIENTS = ("admin", "workers", "app", "auditor", "stranger", "app-r1", "admin-r1", "root")
POLICY = {
    "identities": {
        dev_certs.spiffe_id("admin"): {"roles": ["admin"]},
        dev_certs.spiffe_id("workers"): {"roles": ["admin", "data-plane"]},
        dev_certs.spiffe_id("app"): {"roles": ["data-plane"]},
        dev_certs.spiffe_id("auditor"): {"roles": ["auditor"]},
        dev_certs.spiffe_id("app-r1"): {"roles": ["data-plane"], "resources": ["r1"]},
        dev_certs.spiffe_id("admin-r1"): {"roles": ["admin"], "resources": ["resources/r1"]},
        dev_certs.spiffe_id("root"): {"roles": ["admin", "data-plane", "auditor"]},
        # "stranger" holds a valid certificate but no grant.
    }
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki") / "certs"
    dev_certs.init_dev_certs(directory, CLIENTS)
    (directory / "policy.json").write_text(json.dumps(POLICY))
    return directory


class Callers:
    """One channel per identity to one server."""

    def __init__(self, port: int, pki: Path) -> None:
        self._channels = {c: open_channel(port, client_credentials(pki, c)) for c in CLIENTS}

    def kb(self, client: str) -> Any:
        return pb_grpc.KeyBrokerStub(self._channels[client])

    def storage(self, client: str) -> Any:
        return spb_grpc.StorageStub(self._channels[client])

    def health(self, client: str) -> Any:
        return health_pb2_grpc.HealthStub(self._channels[client])

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


@pytest_asyncio.fixture
async def authz(settings: Settings, pki: Path) -> AsyncIterator[tuple[BrokerUnderTest, Callers]]:
    tls = mtls_settings(
        settings,
        pki,
        policy_file=str(pki / "policy.json"),
        segment_size=4096,
        job_poll_interval=timedelta(hours=1),  # jobs stay pending: only their starting matters
    )
    admin = client_credentials(pki, "admin")
    async with running_broker(tls, with_storage=True, credentials=admin) as b:
        callers = Callers(b.running.port, pki)
        try:
            for r in ("r1", "r2"):
                await b.stub.CreateResource(pb.CreateResourceRequest(resource_id=r))
            yield b, callers
        finally:
            await callers.close()


async def refused(
    b: BrokerUnderTest, method: Any, request: Any, reason: str, caller: str, operation: str
) -> dict[str, Any]:
    """Calls `method(request)`, which must be refused with `reason` without changing state, and
    returns the audit record of the refusal. (The call starts only here: a grpc.aio call runs as
    soon as it is made, and the snapshots must come first.)"""
    before_state = await state_digest(b.engine)
    # The workers' background sweeps may call the broker meanwhile: count this caller's records.
    me = dev_certs.spiffe_id(caller)
    before = [r for r in await audit_rows(b.engine) if r["caller"] == me]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await method(request)
    assert_error(err.value, grpc.StatusCode.PERMISSION_DENIED, reason)
    assert await state_digest(b.engine) == before_state
    rows = [r for r in await audit_rows(b.engine) if r["caller"] == me]
    assert len(rows) == len(before) + 1
    row = rows[-1]
    assert (row["operation"], row["caller"]) == (operation, dev_certs.spiffe_id(caller))
    assert (row["outcome"], row["reason"]) == ("PERMISSION_DENIED", reason)
    return row


def upload(name: str, data: bytes = b"x" * 5000) -> Any:
    async def gen() -> AsyncIterator[spb.UploadModelRequest]:
        yield spb.UploadModelRequest(header=spb.UploadModelRequest.Header(name=name))
        yield spb.UploadModelRequest(chunk=data)

    return gen()


def test_every_rpc_of_both_services_has_a_rule() -> None:
    for service in (
        pb.DESCRIPTOR.services_by_name["KeyBroker"],
        spb.DESCRIPTOR.services_by_name["Storage"],
    ):
        for method in service.methods:
            assert f"/{service.full_name}/{method.name}" in METHOD_RULES, method.name
    assert METHOD_RULES["/keybroker.v1.KeyBroker/ListAuditRecords"].roles == frozenset({AUDITOR})
    assert METHOD_RULES["/keybroker.v1.KeyBroker/DestroyResourceKeyVersion"].roles == frozenset(
        {ADMIN}
    )
    assert METHOD_RULES["/keybroker.v1.KeyBroker/BatchDecryptDataKeys"].roles == frozenset(
        {DATA_PLANE}
    )
    assert METHOD_RULES["/keybroker.v1.Storage/UploadModel"].roles == frozenset({DATA_PLANE})
    assert METHOD_RULES["/keybroker.v1.Storage/StartReencryptJob"].roles == frozenset({ADMIN})
    assert METHOD_RULES["/keybroker.v1.KeyBroker/GetStatus"].roles is None


@pytest.mark.asyncio
async def test_roles_on_the_key_broker(authz: tuple[BrokerUnderTest, Callers]) -> None:
    b, c = authz
    denied = "PERMISSION_DENIED"
    # Admin group: CreateResource.
    await c.kb("admin").CreateResource(pb.CreateResourceRequest(resource_id="a1"))
    create = pb.CreateResourceRequest(resource_id="a2")
    for who in ("app", "auditor", "stranger"):
        row = await refused(b, c.kb(who).CreateResource, create, denied, who, "CreateResource")
        assert row["resource"] == "resources/a2"
    # Data plane: GenerateDataKey, DecryptDataKey.
    generate = pb.GenerateDataKeyRequest(name="resources/r1/models/m")
    key = await c.kb("app").GenerateDataKey(generate)
    assert key.key_id.startswith("resources/r1/")
    for who in ("admin", "auditor", "stranger"):
        await refused(b, c.kb(who).GenerateDataKey, generate, denied, who, "GenerateDataKey")
    decrypt = pb.DecryptDataKeyRequest(name=generate.name, wrapped_data_key=key.wrapped_data_key)
    await refused(b, c.kb("admin").DecryptDataKey, decrypt, denied, "admin", "DecryptDataKey")
    # Auditor: reading, never changing.
    listed = await c.kb("auditor").ListResources(pb.ListResourcesRequest())
    assert {r.name for r in listed.resources} >= {"resources/r1", "resources/r2"}
    listing = pb.ListResourcesRequest()
    await refused(b, c.kb("app").ListResources, listing, denied, "app", "ListResources")
    rotate = pb.RotateResourceKeyRequest(name="resources/r1/resourceKeys/models")
    await refused(
        b, c.kb("auditor").RotateResourceKey, rotate, denied, "auditor", "RotateResourceKey"
    )
    # Auditor: the audit trail, which the other roles may not read.
    trail = await c.kb("auditor").ListAuditRecords(
        pb.ListAuditRecordsRequest(parent="resources/r1")
    )
    assert any(r.operation == "CreateResource" for r in trail.audit_records)
    read_trail = pb.ListAuditRecordsRequest(parent="resources/r1")
    for who in ("admin", "app"):
        await refused(b, c.kb(who).ListAuditRecords, read_trail, denied, who, "ListAuditRecords")
    # Any authenticated caller: status and health, even without a grant.
    status = await c.kb("stranger").GetStatus(pb.GetStatusRequest())
    assert status.healthz == "ok"
    health = await c.health("stranger").Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    # ... but a resource's status only to a grant that covers it.
    named = pb.GetStatusRequest(name="resources/r1")
    await refused(
        b, c.kb("stranger").GetStatus, named, "RESOURCE_NOT_PERMITTED", "stranger", "GetStatus"
    )


@pytest.mark.asyncio
async def test_roles_on_storage(authz: tuple[BrokerUnderTest, Callers]) -> None:
    b, c = authz
    denied = "PERMISSION_DENIED"
    # Data plane: objects.
    model = (await c.storage("app").UploadModel(upload("resources/r1/models/m1"))).model
    assert model.name == "resources/r1/models/m1"
    got = await c.storage("app").GetModel(spb.GetModelRequest(name=model.name))
    assert got.model.size_bytes == 5000
    for who in ("admin", "auditor", "stranger"):
        stream = upload("resources/r1/models/m2")
        row = await refused(b, c.storage(who).UploadModel, stream, denied, who, "UploadModel")
        assert row["resource"] is None  # refused before the stream's first message was read
        get = spb.GetModelRequest(name=model.name)
        await refused(b, c.storage(who).GetModel, get, denied, who, "GetModel")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.storage("app").GetModel(spb.GetModelRequest(name="resources/r1/models/m2"))
    assert_error(err.value, grpc.StatusCode.NOT_FOUND)
    # Admin: jobs.
    start = spb.StartRewrapJobRequest(name="resources/r1")
    job = (await c.storage("admin").StartRewrapJob(start)).job
    assert job.resource == "resources/r1"
    for who in ("app", "auditor"):
        reencrypt = spb.StartReencryptJobRequest(name="resources/r1")
        await refused(
            b, c.storage(who).StartReencryptJob, reencrypt, denied, who, "StartReencryptJob"
        )
        get_job = spb.GetJobRequest(name=job.name)
        await refused(b, c.storage(who).GetJob, get_job, denied, who, "GetJob")


@pytest.mark.asyncio
async def test_a_resource_limited_grant(authz: tuple[BrokerUnderTest, Callers]) -> None:
    b, c = authz
    limited = "RESOURCE_NOT_PERMITTED"
    app, admin = c.kb("app-r1"), c.kb("admin-r1")
    await app.GenerateDataKey(pb.GenerateDataKeyRequest(name="resources/r1/models/m"))
    other = pb.GenerateDataKeyRequest(name="resources/r2/models/m")
    row = await refused(b, app.GenerateDataKey, other, limited, "app-r1", "GenerateDataKey")
    assert row["resource"] == "resources/r2"
    # A batch is refused whole when one item names another resource.
    items = [pb.GenerateDataKeyRequest(name=f"resources/{r}/models/m") for r in ("r1", "r2")]
    batch = pb.BatchGenerateDataKeysRequest(requests=items)
    row = await refused(
        b, app.BatchGenerateDataKeys, batch, limited, "app-r1", "BatchGenerateDataKeys"
    )
    assert row["resource"] is None
    # A name that does not parse cannot be shown to be inside the grant.
    bad = pb.GenerateDataKeyRequest(name="resources/R1/models/m")
    await refused(b, app.GenerateDataKey, bad, limited, "app-r1", "GenerateDataKey")
    # Storage: the upload's name arrives in the stream; the check happens once it is read.
    storage = c.storage("app-r1")
    await storage.UploadModel(upload("resources/r1/models/ok"))
    stream = upload("resources/r2/models/no")
    row = await refused(b, storage.UploadModel, stream, limited, "app-r1", "UploadModel")
    assert row["resource"] == "resources/r2"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.storage("app").GetModel(spb.GetModelRequest(name="resources/r2/models/no"))
    assert_error(err.value, grpc.StatusCode.NOT_FOUND)
    models = spb.ListModelsRequest(parent="resources/r2")
    await refused(b, storage.ListModels, models, limited, "app-r1", "ListModels")
    # Admin limited to r1.
    await admin.RotateResourceKey(
        pb.RotateResourceKeyRequest(name="resources/r1/resourceKeys/models")
    )
    rotate = pb.RotateResourceKeyRequest(name="resources/r2/resourceKeys/models")
    await refused(b, admin.RotateResourceKey, rotate, limited, "admin-r1", "RotateResourceKey")
    create = pb.CreateResourceRequest(resource_id="r3")
    await refused(b, admin.CreateResource, create, limited, "admin-r1", "CreateResource")
    listing = pb.ListResourcesRequest()
    await refused(b, admin.ListResources, listing, limited, "admin-r1", "ListResources")
    # A job's name does not say its resource: GetJob checks the job's resource once loaded.
    own_start = spb.StartRewrapJobRequest(name="resources/r1")
    own = (await c.storage("admin-r1").StartRewrapJob(own_start)).job
    other_start = spb.StartRewrapJobRequest(name="resources/r2")
    other_job = (await c.storage("admin").StartRewrapJob(other_start)).job
    got = await c.storage("admin-r1").GetJob(spb.GetJobRequest(name=own.name))
    assert got.job.name == own.name
    get_other = spb.GetJobRequest(name=other_job.name)
    row = await refused(b, c.storage("admin-r1").GetJob, get_other, limited, "admin-r1", "GetJob")
    assert row["resource"] == "resources/r2"


def probe(channel: grpc.aio.Channel, method: str) -> Any:
    # Raw bytes in and out: no serializers.
    return channel.unary_unary(f"/test.Probe/{method}")


@pytest.mark.asyncio
async def test_an_unmapped_method_is_denied(pki: Path) -> None:
    """A method with a handler but no rule is refused, even to a caller holding every role."""
    ran: list[bytes] = []
    records: list[AuditEvent] = []

    async def handler(request: bytes, context: Any) -> bytes:
        ran.append(request)
        return b"ok"

    async def record(event: AuditEvent) -> None:
        records.append(event)

    policy = load_policy(pki / "policy.json")
    server = grpc.aio.server(interceptors=[ErrorInterceptor(), AuthzInterceptor(policy, record)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Probe", {"Call": grpc.unary_unary_rpc_method_handler(handler)}
            ),
        )
    )
    credentials = tls.server_credentials(pki / "ca.pem", pki / "server.pem", pki / "server.key")
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        async with open_channel(port, client_credentials(pki, "root")) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await probe(channel, "Call")(b"hello", timeout=5)
            assert_error(err.value, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await probe(channel, "Nothing")(b"hello", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)
    assert ran == []
    assert [(e.operation, e.caller, e.outcome) for e in records] == [
        ("Call", dev_certs.spiffe_id("root"), "PERMISSION_DENIED")
    ]


def test_policy_files_are_checked(tmp_path: Path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text('[identities."spiffe://x/app"]\nroles = ["data-plane"]\nresources = ["r1"]\n')
    jsn = tmp_path / "p.json"
    jsn.write_text(
        json.dumps(
            {
                "identities": {
                    "spiffe://x/app": {"roles": ["data-plane"], "resources": ["resources/r1"]}
                }
            }
        )
    )
    assert load_policy(toml) == load_policy(jsn)
    grant = load_policy(toml).grant("spiffe://x/app")
    assert grant is not None and grant.covers("r1") and not grant.covers("r2")
    assert load_policy(toml).grant("spiffe://x/other") is None
    bad: list[tuple[Any, str]] = [
        ({"identities": {"a": {"roles": ["root"]}}}, "unknown role 'root'"),
        ({"identities": {"a": {"roles": []}}}, "non-empty list"),
        ({"identities": {"a": {"roles": ["admin"], "resource": ["r1"]}}}, "unknown key 'resource'"),
        (
            {"identities": {"a": {"roles": ["admin"], "resources": ["R1"]}}},
            "'R1' is not a resource id",
        ),
        ({"identity": {}}, "only top-level key"),
    ]
    for document, message in bad:
        with pytest.raises(ConfigurationError, match=message):
            parse_policy(document)
    broken = tmp_path / "broken.toml"
    broken.write_text("[identities\n")
    with pytest.raises(ConfigurationError, match="does not parse"):
        load_policy(broken)


@pytest.mark.asyncio
async def test_a_bad_policy_file_stops_the_start(
    settings: Settings, pki: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"identities": {"x": {"roles": ["superuser"]}}}))
    message = await refusal(mtls_settings(settings, pki, policy_file=str(bad)))
    assert "unknown role 'superuser'" in message
