"""Customer-managed keys in Azure Key Vault, through the whole broker: the real
azure-keyvault-keys SDK talks to a LOCAL STAND-IN of Key Vault's REST contract
(tests/azure_standin.py), not to Azure, which cannot run here. Covers what only a remote vault
shows: a throttling vault (UNAVAILABLE after bounded retries) and revocation in the vault."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from broker.api import key_broker_pb2 as pb
from broker.core.settings import Settings
from broker.providers.azure_keyvault import azure_keyvault_provider
from broker.providers.registry import registry_from_settings
from broker.providers.retrying import ATTEMPTS
from tests.azure_standin import KeyVaultStandIn, StaticTokenCredential
from tests.harness import BrokerUnderTest, assert_error, running_broker, state_digest

MODEL = "resources/r1/models/m1"


@pytest_asyncio.fixture
async def standin(tmp_path: Path) -> AsyncIterator[KeyVaultStandIn]:
    async with KeyVaultStandIn(tmp_path) as vault:
        yield vault


@pytest_asyncio.fixture
async def kb(settings: Settings, standin: KeyVaultStandIn) -> AsyncIterator[BrokerUnderTest]:
    settings = replace(settings, cmk_failure_ttl=timedelta(seconds=0.2))
    credential = StaticTokenCredential()
    registry = registry_from_settings(
        settings,
        {
            "azure-keyvault": lambda: azure_keyvault_provider(
                credential_for=lambda _identity: credential,
                connection_verify=str(standin.ca_file),
            )
        },
    )
    async with running_broker(settings, providers=registry) as broker:
        yield broker


async def enable_rsa(kb: BrokerUnderTest, standin: KeyVaultStandIn) -> str:
    key = standin.add_rsa_key("cmk")
    await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    reply = await kb.stub.EnableCustomerManagedKey(
        pb.EnableCustomerManagedKeyRequest(
            name="resources/r1",
            key=pb.CustomerKeyReference(
                provider="azure-keyvault",
                vault=standin.url,
                key_name="cmk",
                version=key.latest.version,
            ),
        )
    )
    return reply.resource.customer_managed_key.key_id


@pytest.mark.asyncio
async def test_azure_key_protects_data_and_its_revocation_and_return_are_seen(
    kb: BrokerUnderTest, standin: KeyVaultStandIn
) -> None:
    key_id = await enable_rsa(kb, standin)
    assert key_id.startswith(f"azure-keyvault:{standin.url}/cmk/")
    assert standin.calls["wrapkey"] >= 3  # the probe and the re-wraps ran in the vault
    made = await kb.stub.GenerateDataKey(pb.GenerateDataKeyRequest(name=MODEL))
    request = pb.DecryptDataKeyRequest(name=MODEL, wrapped_data_key=made.wrapped_data_key)

    standin.keys["cmk"].latest.enabled = False  # the customer disables the key in the vault
    kb.running.broker.keys.cache.clear()
    digest = await state_digest(kb.engine)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.stub.DecryptDataKey(request)
    assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_KEY_UNAVAILABLE")
    assert await state_digest(kb.engine) == digest

    standin.keys["cmk"].latest.enabled = True
    await asyncio.sleep(0.25)  # the remembered failure expires; no admin action needed
    assert (await kb.stub.DecryptDataKey(request)).plaintext_data_key == made.plaintext_data_key


@pytest.mark.asyncio
async def test_a_throttling_vault_gives_unavailable_after_bounded_retries(
    kb: BrokerUnderTest, standin: KeyVaultStandIn
) -> None:
    await enable_rsa(kb, standin)
    made = await kb.stub.GenerateDataKey(pb.GenerateDataKeyRequest(name=MODEL))
    request = pb.DecryptDataKeyRequest(name=MODEL, wrapped_data_key=made.wrapped_data_key)
    kb.running.broker.keys.cache.clear()
    standin.keys["cmk"].throttle(1000)
    unwraps = standin.calls["unwrapkey"]
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.stub.DecryptDataKey(request, timeout=10)
    assert_error(err.value, grpc.StatusCode.UNAVAILABLE, "CUSTOMER_KEY_VAULT_UNAVAILABLE")
    assert time.monotonic() - started < 5
    throttled = standin.keys["cmk"]
    assert 1000 - throttled.throttled == ATTEMPTS  # bounded: the vault saw exactly that many
    assert standin.calls["unwrapkey"] == unwraps

    # A short caller deadline ends the wait sooner than the retries would.
    kb.running.broker.keys.cache.clear()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kb.stub.DecryptDataKey(request, timeout=0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    throttled.throttle(0)
    await asyncio.sleep(0.25)
    kb.running.broker.keys.cache.clear()
    assert (await kb.stub.DecryptDataKey(request)).plaintext_data_key == made.plaintext_data_key
