"""Customer-managed keys end to end through the real broker: enable, rotate, move, follow-latest,
revoke and restore, disable, legacy scope, the cutoff, and the refusals. The customer's key store
is, in turn, a real PKCS#11 HSM (SoftHSM2; revocation switches the key's usage attributes off in
the token) and the dev vault (file-backed, in the data directory). The Azure Key Vault provider
has a contract suite of its own against a local stand-in
(tests/providers/test_azure_provider.py)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text

from broker.api import key_broker_pb2 as pb
from broker.core.settings import Settings
from broker.lifecycle import customer_key_probes
from broker.lifecycle.janitor import tick
from broker.providers.dev_vault import FILE_NAME, DevVaultStore
from tests import softhsm
from tests.harness import BrokerUnderTest, assert_error, audit_rows, running_broker, state_digest

MODEL = "resources/r1/models/m1"
RESULT = "resources/r1/analyzeResults/a1"
Keys = list[tuple[str, bytes, bytes]]


@dataclass(frozen=True)
class Created:
    version: str


class CustomerVault(Protocol):
    """What a test does to the customer's key store, whatever it is."""

    def ref(self, key_name: str, version: str = "") -> pb.CustomerKeyReference: ...
    def create_key(self, key_name: str, kty: str, bits: int) -> Created: ...
    def set_enabled(self, key_name: str, version: str, enabled: bool) -> None: ...
    def set_deleted(self, key_name: str, deleted: bool) -> None: ...


class DevVault:
    def __init__(self, store: DevVaultStore) -> None:
        self.store = store

    def ref(self, key_name: str, version: str = "") -> pb.CustomerKeyReference:
        return pb.CustomerKeyReference(
            provider="dev-vault", vault="dev", key_name=key_name, version=version
        )

    def create_key(self, key_name: str, kty: str, bits: int) -> Created:
        return Created(self.store.create_key(key_name, kty, bits).version)

    def set_enabled(self, key_name: str, version: str, enabled: bool) -> None:
        self.store.set_enabled(key_name, version, enabled)

    def set_deleted(self, key_name: str, deleted: bool) -> None:
        self.store.set_deleted(key_name, deleted)


class Hsm:
    """Keys in the session's SoftHSM2 token, under labels unique to one test."""

    def __init__(self) -> None:
        self.prefix = uuid.uuid4().hex[:8]
        self.ids: dict[str, int] = {}

    def _label(self, key_name: str) -> str:
        return f"{self.prefix}-{key_name}"

    def ref(self, key_name: str, version: str = "") -> pb.CustomerKeyReference:
        return pb.CustomerKeyReference(
            provider="pkcs11", vault=softhsm.TOKEN, key_name=self._label(key_name), version=version
        )

    def create_key(self, key_name: str, kty: str, bits: int) -> Created:
        key_id = bytes([self.ids.get(key_name, 0) + 1])  # later versions have greater CKA_IDs
        self.ids[key_name] = key_id[0]
        label = self._label(key_name)
        if kty == "AES":
            softhsm.create_aes_key(softhsm.TOKEN, softhsm.PIN, label, key_id, bits=bits)
        else:
            softhsm.create_rsa_key(softhsm.TOKEN, softhsm.PIN, label, key_id, bits)
        return Created(key_id.hex())

    def set_enabled(self, key_name: str, version: str, enabled: bool) -> None:
        versions = [version] if version else [f"{i:02x}" for i in range(1, self.ids[key_name] + 1)]
        for v in versions:
            softhsm.set_key_usable(
                softhsm.TOKEN, softhsm.PIN, self._label(key_name), bytes.fromhex(v), enabled
            )

    def set_deleted(self, key_name: str, deleted: bool) -> None:
        self.set_enabled(key_name, "", not deleted)  # as good as deleted for the broker


@pytest.fixture(params=["pkcs11", "dev-vault"])
def vault_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def cmk_settings(settings: Settings, vault_kind: str, request: pytest.FixtureRequest) -> Settings:
    settings = replace(
        settings,
        dev_vault=True,
        cache_ttl=timedelta(minutes=5),
        # Long enough for the checks between a failure and its reuse, even on a loaded machine.
        cmk_failure_ttl=timedelta(seconds=1),
    )
    if vault_kind == "pkcs11":
        request.getfixturevalue("softhsm_token")
        settings = replace(
            settings,
            pkcs11_module=softhsm.MODULE,
            pkcs11_pin=softhsm.PIN,
            # SoftHSM 2.6 offers RSA-OAEP with SHA-1 only.
            pkcs11_allow_oaep_sha1=True,
        )
    return settings


@pytest.fixture
def dev_store(cmk_settings: Settings) -> DevVaultStore:
    cmk_settings.data_dir.mkdir(parents=True, exist_ok=True)
    return DevVaultStore(cmk_settings.data_dir / FILE_NAME)


@pytest.fixture
def vault(vault_kind: str, dev_store: DevVaultStore) -> CustomerVault:
    return Hsm() if vault_kind == "pkcs11" else DevVault(dev_store)


@pytest_asyncio.fixture
async def kb(cmk_settings: Settings) -> AsyncIterator[BrokerUnderTest]:
    async with running_broker(cmk_settings) as b:
        yield b


def key_id_of(key: pb.CustomerKeyReference) -> str:
    return f"{key.provider}:{key.vault}/{key.key_name}/{key.version}"


async def data_keys(kb: BrokerUnderTest, names: tuple[str, ...] = (MODEL, RESULT)) -> Keys:
    out: Keys = []
    for name in names:
        key = await kb.stub.GenerateDataKey(pb.GenerateDataKeyRequest(name=name))
        out.append((name, key.wrapped_data_key, key.plaintext_data_key))
    return out


async def decrypt(kb: BrokerUnderTest, name: str, wrapped: bytes) -> bytes:
    reply = await kb.stub.DecryptDataKey(
        pb.DecryptDataKeyRequest(name=name, wrapped_data_key=wrapped)
    )
    return reply.plaintext_data_key


async def assert_all_decrypt(kb: BrokerUnderTest, keys: Keys) -> None:
    for name, wrapped, plaintext in keys:
        assert await decrypt(kb, name, wrapped) == plaintext


async def version_roots(kb: BrokerUnderTest, resource_id: str = "r1") -> dict[tuple[str, int], Any]:
    async with kb.engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT purpose, version, root_key_id, wrapped_key FROM key_versions"
                " WHERE resource_id = :r"
            ),
            {"r": resource_id},
        )
        return {(r[0], r[1]): (r[2], bytes(r[3]) if r[3] is not None else None) for r in rows}


async def enable(
    kb: BrokerUnderTest, key: pb.CustomerKeyReference, follow: bool = False
) -> pb.Resource:
    reply = await kb.stub.EnableCustomerManagedKey(
        pb.EnableCustomerManagedKeyRequest(name="resources/r1", key=key, follow_latest=follow)
    )
    return reply.resource


def drop_cache(kb: BrokerUnderTest) -> None:
    kb.running.broker.keys.cache.clear()


@pytest.mark.asyncio
async def test_enable_rewraps_every_version_and_starts_fresh_ones(
    kb: BrokerUnderTest, vault: CustomerVault
) -> None:
    v = vault.create_key("k1", "RSA", 2048)
    await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    before = await data_keys(kb)
    roots_before = await version_roots(kb)

    resource = await enable(kb, vault.ref("k1", v.version))
    key_id = key_id_of(vault.ref("k1", v.version))
    assert resource.customer_managed_key.key_id == key_id
    assert list(resource.customer_managed_key.scope) == [pb.MODELS, pb.RESULTS]
    for enc in resource.encryption:
        assert enc.key_source == pb.CUSTOMER_MANAGED
        assert enc.root_key_id == key_id
        assert enc.current_key_version.endswith("/versions/2")

    roots = await version_roots(kb)
    assert set(roots) == {("models", 1), ("models", 2), ("results", 1), ("results", 2)}
    assert all(root == key_id for root, _ in roots.values())
    # The old service-managed copies are gone: version 1 is stored re-wrapped.
    assert roots[("models", 1)][1] != roots_before[("models", 1)][1]

    drop_cache(kb)
    await assert_all_decrypt(kb, before)
    after = await data_keys(kb)
    for name, wrapped, _ in after:
        reply = await kb.stub.DecryptDataKey(
            pb.DecryptDataKeyRequest(name=name, wrapped_data_key=wrapped)
        )
        assert reply.key_id.endswith("/versions/2")
    audit = [r for r in await audit_rows(kb.engine) if r["operation"] == "EnableCustomerManagedKey"]
    assert len(audit) == 1
    assert key_id in audit[0]["key_ids"]
    assert "resources/r1/serviceRootKey/versions/1" in audit[0]["key_ids"]


@pytest.mark.asyncio
async def test_revocation_refuses_data_keys_until_access_returns(
    kb: BrokerUnderTest, vault: CustomerVault
) -> None:
    v = vault.create_key("k1", "AES", 256)
    await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    await enable(kb, vault.ref("k1", v.version))
    keys = await data_keys(kb)
    vault.set_enabled("k1", "", False)
    drop_cache(kb)  # stands in for the cache TTL passing
    digest = await state_digest(kb.engine)
    for name, wrapped, _ in keys:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await decrypt(kb, name, wrapped)
        assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_KEY_UNAVAILABLE")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.stub.GenerateDataKey(pb.GenerateDataKeyRequest(name=MODEL))
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_KEY_UNAVAILABLE")
    assert await state_digest(kb.engine) == digest  # nothing stored changed
    # The provider's refusal is audited with the versioned id of the key that refused.
    refused = [r for r in await audit_rows(kb.engine) if r["reason"] == "CUSTOMER_KEY_UNAVAILABLE"]
    assert refused
    assert all(key_id_of(vault.ref("k1", v.version)) in r["key_ids"] for r in refused)

    # The failure is remembered briefly: no vault call per request meanwhile.
    calls = kb.running.broker.keys.cache.counters.loads
    for _ in range(10):
        with pytest.raises(grpc.aio.AioRpcError):
            await decrypt(kb, *keys[0][:2])
    assert kb.running.broker.keys.cache.counters.loads == calls

    vault.set_enabled("k1", "", True)
    await asyncio.sleep(1.05)  # the remembered failure expires; no admin action
    await assert_all_decrypt(kb, keys)


@pytest.mark.asyncio
async def test_a_failure_seen_drops_every_cached_key_of_the_resource_at_once(
    kb: BrokerUnderTest, vault: CustomerVault
) -> None:
    v = vault.create_key("k1", "AES", 256)
    await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    await enable(kb, vault.ref("k1", v.version))
    model_key, result_key = await data_keys(kb)  # both versions now cached
    vault.set_enabled("k1", "", False)
    # The models key is still cached; the results version is evicted and must be reloaded.
    kb.running.broker.keys.cache.invalidate(lambda k: k[1] == "results")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await decrypt(kb, *result_key[:2])
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_KEY_UNAVAILABLE")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await decrypt(kb, *model_key[:2])
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_KEY_UNAVAILABLE")


@pytest.mark.asyncio
async def test_deletes_work_while_the_customer_key_is_revoked(
    kb: BrokerUnderTest, vault: CustomerVault
) -> None:
    v = vault.create_key("k1", "AES", 256)
    await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    await enable(kb, vault.ref("k1", v.version))
    vault.set_enabled("k1", "", False)
    drop_cache(kb)
    reply = await kb.stub.DeleteResource(pb.DeleteResourceRequest(name="resources/r1"))
    assert reply.resource.state == pb.Resource.DELETE_SCHEDULED


@pytest.mark.asyncio
async def test_new_key_version_rewraps_only_and_another_key_starts_a_fresh_version(
    kb: BrokerUnderTest, vault: CustomerVault
) -> None:
    v1 = vault.create_key("k1", "RSA", 2048)
    await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    keys = await data_keys(kb)
    await enable(kb, vault.ref("k1", v1.version))
    keys += await data_keys(kb)

    v2 = vault.create_key("k1", "RSA", 2048)  # the customer rotates their key
    rotated = await kb.stub.UpdateCustomerManagedKey(
        pb.UpdateCustomerManagedKeyRequest(name="resources/r1", key=vault.ref("k1", v2.version))
    )
    new_id = key_id_of(vault.ref("k1", v2.version))
    assert rotated.resource.customer_managed_key.key_id == new_id
    assert all(e.current_key_version.endswith("/versions/2") for e in rotated.resource.encryption)
    assert {root for root, _ in (await version_roots(kb)).values()} == {new_id}
    vault.set_enabled("k1", v1.version, False)  # the old version is no longer needed
    drop_cache(kb)
    await assert_all_decrypt(kb, keys)

    k2 = vault.create_key("k2", "AES", 256)
    moved = await kb.stub.UpdateCustomerManagedKey(
        pb.UpdateCustomerManagedKeyRequest(name="resources/r1", key=vault.ref("k2", k2.version))
    )
    assert all(e.current_key_version.endswith("/versions/3") for e in moved.resource.encryption)
    vault.set_enabled("k1", "", False)
    drop_cache(kb)
    await assert_all_decrypt(kb, keys)


@pytest.mark.asyncio
async def test_follow_latest_moves_to_a_new_version_when_polled(
    kb: BrokerUnderTest, vault: CustomerVault
) -> None:
    v1 = vault.create_key("k1", "AES", 256)
    await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    resource = await enable(kb, vault.ref("k1"), follow=True)
    assert resource.customer_managed_key.key.version == v1.version
    assert resource.customer_managed_key.follow_latest
    keys = await data_keys(kb)
    broker = kb.running.broker
    assert await tick(broker.lifecycle, broker.customer_keys) == (0, 0, 0)
    v2 = vault.create_key("k1", "AES", 256)
    assert await tick(broker.lifecycle, broker.customer_keys) == (0, 0, 0)  # not due yet
    kb.clock.advance(timedelta(hours=1, seconds=1))
    assert await tick(broker.lifecycle, broker.customer_keys) == (0, 0, 1)
    got = await kb.stub.GetResource(pb.GetResourceRequest(name="resources/r1"))
    assert got.resource.customer_managed_key.key.version == v2.version
    vault.set_enabled("k1", v1.version, False)
    drop_cache(kb)
    await assert_all_decrypt(kb, keys)
    rotations = [
        r for r in await audit_rows(kb.engine) if r["operation"] == "RotateCustomerManagedKey"
    ]
    assert len(rotations) == 1


@pytest.mark.asyncio
async def test_disable_returns_to_service_managed_keys_without_data_loss(
    kb: BrokerUnderTest, vault: CustomerVault
) -> None:
    v = vault.create_key("k1", "RSA", 2048)
    await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    keys = await data_keys(kb)
    await enable(kb, vault.ref("k1", v.version))
    keys += await data_keys(kb)
    reply = await kb.stub.DisableCustomerManagedKey(
        pb.DisableCustomerManagedKeyRequest(name="resources/r1")
    )
    assert not reply.resource.HasField("customer_managed_key")
    assert all(e.key_source == pb.SERVICE_MANAGED for e in reply.resource.encryption)
    assert all(e.current_key_version.endswith("/versions/3") for e in reply.resource.encryption)
    # The customer key is no longer needed at all.
    vault.set_deleted("k1", True)
    drop_cache(kb)
    await assert_all_decrypt(kb, keys)
    assert {root for root, _ in (await version_roots(kb)).values()} == {
        "resources/r1/serviceRootKey/versions/1"
    }


@pytest.mark.asyncio
async def test_legacy_import_covers_models_only_until_disabled_and_enabled_again(
    kb: BrokerUnderTest, vault: CustomerVault
) -> None:
    v = vault.create_key("k1", "AES", 256)
    request = pb.ImportResourceRequest(
        resource_id="r1",
        customer_managed_key=vault.ref("k1", v.version),
        legacy_customer_managed_key_scope=True,
    )
    request.create_time.FromDatetime(datetime(2022, 1, 1, tzinfo=UTC))
    imported = (await kb.stub.ImportResource(request)).resource
    assert list(imported.customer_managed_key.scope) == [pb.MODELS]
    sources = {e.purpose: e.key_source for e in imported.encryption}
    assert sources == {pb.MODELS: pb.CUSTOMER_MANAGED, pb.RESULTS: pb.SERVICE_MANAGED}
    keys = await data_keys(kb)

    await kb.stub.DisableCustomerManagedKey(
        pb.DisableCustomerManagedKeyRequest(name="resources/r1")
    )
    upgraded = await enable(kb, vault.ref("k1", v.version))
    assert list(upgraded.customer_managed_key.scope) == [pb.MODELS, pb.RESULTS]
    assert {e.key_source for e in upgraded.encryption} == {pb.CUSTOMER_MANAGED}
    drop_cache(kb)
    await assert_all_decrypt(kb, keys)


@pytest.mark.asyncio
async def test_resources_created_before_the_cutoff_are_refused(
    kb: BrokerUnderTest, vault: CustomerVault
) -> None:
    v = vault.create_key("k1", "AES", 256)
    request = pb.ImportResourceRequest(resource_id="r1")
    request.create_time.FromDatetime(datetime(2020, 5, 10, 23, 59, tzinfo=UTC))
    await kb.stub.ImportResource(request)
    digest = await state_digest(kb.engine)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await enable(kb, vault.ref("k1", v.version))
    assert_error(
        err.value, grpc.StatusCode.FAILED_PRECONDITION, "RESOURCE_CREATED_BEFORE_CMK_CUTOFF"
    )
    assert "create a new resource" in (err.value.details() or "")
    assert await state_digest(kb.engine) == digest


@pytest.mark.asyncio
@pytest.mark.parametrize("vault_kind", ["dev-vault"], indirect=True)
async def test_unfit_keys_and_vaults_are_refused_precisely(
    kb: BrokerUnderTest, dev_store: DevVaultStore
) -> None:
    vault = DevVault(dev_store)
    await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    v = vault.create_key("small", "AES", 256)
    data = json.loads(dev_store.path.read_text())
    data["keys"]["small"]["versions"][0]["size"] = 128  # an AES-128 key
    dev_store.path.write_text(json.dumps(data))
    good = vault.create_key("good", "RSA", 2048)
    digest = await state_digest(kb.engine)
    cases: list[tuple[pb.CustomerKeyReference, grpc.StatusCode, str]] = [
        (
            vault.ref("small", v.version),
            grpc.StatusCode.FAILED_PRECONDITION,
            "UNSUPPORTED_CUSTOMER_KEY",
        ),
        (vault.ref("missing", "00"), grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_KEY_NOT_FOUND"),
        (vault.ref("good", "ffff"), grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_KEY_NOT_FOUND"),
        (vault.ref("good", ""), grpc.StatusCode.INVALID_ARGUMENT, "MISSING_FIELD"),
        (
            pb.CustomerKeyReference(provider="kms9", vault="v", key_name="k", version="1"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNKNOWN_KEY_PROVIDER",
        ),
        (
            pb.CustomerKeyReference(provider="pkcs11", vault="t", key_name="k", version="1"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "KEY_PROVIDER_NOT_CONFIGURED",
        ),
    ]
    for key, code, reason in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await enable(kb, key)
        assert_error(err.value, code, reason)
    vault.set_enabled("good", "", False)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await enable(kb, vault.ref("good", good.version))
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_KEY_UNAVAILABLE")
    vault.set_enabled("good", "", True)
    dev_store.set_flags(soft_delete=True, purge_protection=False)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await enable(kb, vault.ref("good", good.version))
    assert_error(
        err.value, grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_KEY_VAULT_NOT_RECOVERABLE"
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.stub.DisableCustomerManagedKey(
            pb.DisableCustomerManagedKeyRequest(name="resources/r1")
        )
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_KEY_NOT_ENABLED")
    assert await state_digest(kb.engine) == digest


@pytest.mark.asyncio
async def test_a_stored_key_whose_inner_seal_belongs_to_another_resource_is_refused(
    kb: BrokerUnderTest, vault: CustomerVault
) -> None:
    # Both resources sit under the same customer key, so the outer layer of one resource's
    # stored version opens for the other too; the inner service seal is what binds it.
    v = vault.create_key("k1", "AES", 256)
    for rid in ("r1", "r2"):
        await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id=rid))
        await kb.stub.EnableCustomerManagedKey(
            pb.EnableCustomerManagedKeyRequest(
                name=f"resources/{rid}", key=vault.ref("k1", v.version)
            )
        )
    ((name, wrapped, _),) = await data_keys(kb, (MODEL,))
    async with kb.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE key_versions SET wrapped_key = (SELECT wrapped_key FROM key_versions"
                " WHERE resource_id = 'r2' AND purpose = 'models' AND version = 2)"
                " WHERE resource_id = 'r1' AND purpose = 'models' AND version = 2"
            )
        )
    drop_cache(kb)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await decrypt(kb, name, wrapped)
    assert_error(err.value, grpc.StatusCode.DATA_LOSS, "STORED_KEY_CORRUPT")


@pytest.mark.asyncio
async def test_concurrent_decrypts_on_a_cold_cache_make_one_vault_call_per_key(
    kb: BrokerUnderTest, vault: CustomerVault
) -> None:
    v = vault.create_key("k1", "RSA", 2048)
    await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    await enable(kb, vault.ref("k1", v.version))
    ((name, wrapped, plaintext),) = await data_keys(kb, (MODEL,))
    drop_cache(kb)
    before = kb.running.broker.keys.cache.counters.loads
    replies = await asyncio.gather(*(decrypt(kb, name, wrapped) for _ in range(64)))
    assert set(replies) == {plaintext}
    assert kb.running.broker.keys.cache.counters.loads - before == 1


@pytest.mark.asyncio
async def test_generating_and_decrypting_share_one_vault_call_per_key(
    kb: BrokerUnderTest, vault: CustomerVault
) -> None:
    """Callers generating (the current version) and decrypting (that same version, by number)
    on a cold cache make one root-key call between them, and GetStatus counts exactly that."""
    v = vault.create_key("k1", "RSA", 2048)
    await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    await enable(kb, vault.ref("k1", v.version))
    ((name, wrapped, plaintext),) = await data_keys(kb, (MODEL,))
    drop_cache(kb)
    status = await kb.stub.GetStatus(pb.GetStatusRequest())
    before = status.key_cache.root_key_calls
    generate = pb.GenerateDataKeyRequest(name=name)
    calls = [kb.stub.GenerateDataKey(generate) for _ in range(32)]
    replies = await asyncio.gather(*calls, *(decrypt(kb, name, wrapped) for _ in range(32)))
    assert set(replies[32:]) == {plaintext}
    status = await kb.stub.GetStatus(pb.GetStatusRequest())
    assert status.key_cache.root_key_calls - before == 1
    assert kb.running.broker.keys.root_key_calls == status.key_cache.root_key_calls


# -- the background probe (broker.lifecycle.customer_key_probes) -------------------------------


async def probe_round(kb: BrokerUnderTest) -> tuple[int, int]:
    """One round of the background probe, run now instead of waiting for its interval."""
    counts = await customer_key_probes.probe_all(kb.running.broker.sessions, kb.running.broker.keys)
    return counts.keys, counts.failed


async def resource_status(kb: BrokerUnderTest) -> pb.GetStatusResponse:
    reply: pb.GetStatusResponse = await kb.stub.GetStatus(pb.GetStatusRequest(name="resources/r1"))
    return reply


@pytest.mark.asyncio
async def test_a_failed_probe_reaches_warm_cached_keys_and_status_and_recovery_is_at_once(
    kb: BrokerUnderTest, vault: CustomerVault
) -> None:
    await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    created = vault.create_key("probed", "RSA", 2048)
    key = vault.ref("probed", created.version)
    await enable(kb, key)
    keys = await data_keys(kb)
    await assert_all_decrypt(kb, keys)  # the cache is warm now
    assert await probe_round(kb) == (1, 0)
    status = await resource_status(kb)
    assert status.healthz == "ok"
    probe = status.customer_key_probe
    assert (probe.key_id, probe.ok, probe.reason) == (key_id_of(key), True, "")

    # The customer revokes the key: the warm cache would keep serving until its TTL (5 min),
    # but one probe round later the calls meet the revocation.
    vault.set_enabled("probed", created.version, False)
    await assert_all_decrypt(kb, keys)
    assert await probe_round(kb) == (1, 1)
    for name, wrapped, _ in keys:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await decrypt(kb, name, wrapped)
        assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_KEY_UNAVAILABLE")
    status = await resource_status(kb)
    assert status.customer_key_probe.ok is False
    assert status.customer_key_probe.reason == "CUSTOMER_KEY_UNAVAILABLE"
    assert status.healthz == "customer-managed key unavailable (CUSTOMER_KEY_UNAVAILABLE)"
    # A revoked customer key is the resource's business, not the server's.
    assert (await kb.stub.GetStatus(pb.GetStatusRequest())).healthz == "ok"
    health: Any = health_pb2_grpc.HealthStub(kb.channel)
    for service in ("", "keybroker.v1.KeyBroker"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    # Access returns: the next probe clears the failure, and calls resume at once (not after
    # the failure memory or the next probe interval).
    vault.set_enabled("probed", created.version, True)
    assert await probe_round(kb) == (1, 0)
    await assert_all_decrypt(kb, keys)
    status = await resource_status(kb)
    assert (status.healthz, status.customer_key_probe.ok) == ("ok", True)


@pytest.mark.asyncio
async def test_one_probe_per_customer_key_however_many_resources_use_it(
    kb: BrokerUnderTest, vault: CustomerVault
) -> None:
    created = vault.create_key("shared", "RSA", 2048)
    key = vault.ref("shared", created.version)
    for r in ("r1", "r2", "r3"):
        await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id=r))
        await kb.stub.EnableCustomerManagedKey(
            pb.EnableCustomerManagedKeyRequest(name=f"resources/{r}", key=key)
        )
    assert await probe_round(kb) == (1, 0)
