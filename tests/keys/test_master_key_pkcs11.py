"""The service master key in a PKCS#11 token (SoftHSM2): created on first start, restarts,
refusal of a database sealed by another master key, rotation, and a key switched off in the
token. Each test uses a label of its own in the session's one token."""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import grpc
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pkcs11 import Attribute, ObjectClass

from broker.api import key_broker_pb2 as pb
from broker.core.settings import Settings
from broker.keys import master_key_check, master_key_pkcs11
from tests import softhsm
from tests.harness import assert_error, audit_rows, refusal, running_broker
from tests.keys.test_master_key import (
    assert_decrypt,
    first_run,
    populate,
    rotate_offline,
    rows,
    status_key_id,
)

FAILURE_TTL = timedelta(seconds=0.2)


@pytest.fixture
def hsm_settings(settings: Settings, softhsm_token: str) -> Settings:
    return replace(
        settings,
        master_key_pkcs11_label=f"mk-{uuid.uuid4().hex[:12]}",
        master_key_pkcs11_token=softhsm_token,
        pkcs11_module=softhsm.MODULE,
        pkcs11_pin=softhsm.PIN,
        cmk_failure_ttl=FAILURE_TTL,
    )


def key_id(settings: Settings, version: str) -> str:
    return f"pkcs11:{settings.master_key_pkcs11_token}/{settings.master_key_pkcs11_label}/{version}"


def token_keys(settings: Settings) -> dict[str, dict[Attribute, Any]]:
    """The secret keys under the settings' label: CKA_ID hex -> some of their attributes."""
    found: dict[str, dict[Attribute, Any]] = {}
    template = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.LABEL: settings.master_key_pkcs11_label,
    }
    names = (
        Attribute.VALUE_LEN,
        Attribute.SENSITIVE,
        Attribute.EXTRACTABLE,
        Attribute.ENCRYPT,
        Attribute.DECRYPT,
        Attribute.WRAP,
        Attribute.TOKEN,
    )
    with softhsm.open_session(settings.master_key_pkcs11_token, softhsm.PIN) as session:
        for obj in session.get_objects(template):
            found[obj[Attribute.ID].hex()] = {a: obj[a] for a in names}
    return found


def set_usable(settings: Settings, version: str, usable: bool) -> None:
    softhsm.set_key_usable(
        settings.master_key_pkcs11_token,
        softhsm.PIN,
        settings.master_key_pkcs11_label,
        bytes.fromhex(version),
        usable,
    )


@pytest.mark.asyncio
async def test_token_key_is_created_on_first_start_and_survives_restarts(
    hsm_settings: Settings,
) -> None:
    assert token_keys(hsm_settings) == {}
    async with running_broker(hsm_settings) as broker:
        assert await status_key_id(broker) == key_id(hsm_settings, "01")
        keys = await populate(broker)
        await assert_decrypt(broker, keys)
    assert not hsm_settings.master_key_file.exists()
    assert token_keys(hsm_settings) == {
        "01": {
            Attribute.VALUE_LEN: 32,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.WRAP: False,
            Attribute.TOKEN: True,
        }
    }

    async with running_broker(hsm_settings) as broker:
        assert await status_key_id(broker) == key_id(hsm_settings, "01")
        await assert_decrypt(broker, keys)
        keys += await populate(broker, ["r3"])
        assert await rows(broker.engine, "SELECT DISTINCT master_key_id FROM resources") == [
            (key_id(hsm_settings, "01"),)
        ]
    async with running_broker(hsm_settings) as broker:
        await assert_decrypt(broker, keys)
    assert list(token_keys(hsm_settings)) == ["01"]  # no key made on later starts
    assert not hsm_settings.master_key_file.exists()


@pytest.mark.asyncio
async def test_a_database_sealed_by_another_master_key_is_refused(
    hsm_settings: Settings, settings: Settings
) -> None:
    token_id, _ = await first_run(hsm_settings)
    # A key file cannot open root keys sealed in the token (and none is made in its place).
    message = await refusal(settings)
    assert "missing" in message and token_id in message
    assert not settings.master_key_file.exists()
    # Another label in the token holds no key: nothing is generated over a sealed database.
    other = replace(hsm_settings, master_key_pkcs11_label=f"mk-{uuid.uuid4().hex[:12]}")
    message = await refusal(other)
    assert "holds no master key" in message and token_id in message
    assert token_keys(other) == {}
    # A key under the label that is not the one the database names.
    softhsm.create_aes_key(softhsm.TOKEN, softhsm.PIN, other.master_key_pkcs11_label, b"\x01")
    message = await refusal(other)
    assert token_id in message and key_id(other, "01") in message
    assert "not the database's master key" in message


@pytest.mark.asyncio
async def test_a_key_file_database_is_refused_by_the_token_key(
    settings: Settings, hsm_settings: Settings
) -> None:
    file_id, _ = await first_run(settings)
    message = await refusal(hsm_settings)
    assert file_id in message and "holds no master key" in message
    assert token_keys(hsm_settings) == {}


@pytest.mark.asyncio
async def test_rotation_reseals_under_the_next_cka_id(hsm_settings: Settings) -> None:
    old_id, keys = await first_run(hsm_settings)
    async with running_broker(hsm_settings) as broker:
        roots_before = dict(await rows(broker.engine, "SELECT id, root_key_sealed FROM resources"))
        versions_before = await rows(broker.engine, "SELECT * FROM key_versions ORDER BY 1, 2, 3")

    old, new, count = await rotate_offline(hsm_settings)
    assert (old, new, count) == (old_id, key_id(hsm_settings, "02"), 2)
    assert list(token_keys(hsm_settings)) == ["01", "02"]  # the old key stays in the token

    async with running_broker(hsm_settings) as broker:
        assert await status_key_id(broker) == new
        await assert_decrypt(broker, keys)
        roots_after = dict(await rows(broker.engine, "SELECT id, root_key_sealed FROM resources"))
        assert roots_after.keys() == roots_before.keys()
        assert all(bytes(roots_after[r]) != bytes(roots_before[r]) for r in roots_after)
        assert await rows(broker.engine, "SELECT DISTINCT master_key_id FROM resources") == [(new,)]
        assert (
            await rows(broker.engine, "SELECT * FROM key_versions ORDER BY 1, 2, 3")
            == versions_before
        )
        audit = [r for r in await audit_rows(broker.engine) if r["operation"] == "RotateMasterKey"]
        assert len(audit) == 1 and audit[0]["item_count"] == 2
        assert set(audit[0]["key_ids"].split()) == {old, new}
        keys += await populate(broker, ["r3"])

    # The old key no longer opens anything: switching it off changes nothing.
    set_usable(hsm_settings, "01", False)
    async with running_broker(hsm_settings) as broker:
        await assert_decrypt(broker, keys)


@pytest.mark.asyncio
async def test_a_rotation_that_did_not_commit_leaves_the_database_key_in_force(
    hsm_settings: Settings,
) -> None:
    old_id, keys = await first_run(hsm_settings)
    # A rotation that generated its key in the token, then crashed before the commit.
    label = hsm_settings.master_key_pkcs11_label
    softhsm.create_aes_key(softhsm.TOKEN, softhsm.PIN, label, b"\x02")
    async with running_broker(hsm_settings) as broker:
        assert await status_key_id(broker) == old_id
        await assert_decrypt(broker, keys)
        keys += await populate(broker, ["r3"])
    _, new, count = await rotate_offline(hsm_settings)
    assert (new, count) == (key_id(hsm_settings, "03"), 3)
    async with running_broker(hsm_settings) as broker:
        assert await status_key_id(broker) == new
        await assert_decrypt(broker, keys)


@pytest.mark.asyncio
async def test_a_master_key_switched_off_in_the_token(hsm_settings: Settings) -> None:
    async with running_broker(hsm_settings) as broker:
        keys = await populate(broker)
        name, wrapped, plaintext = keys[0]
        request = pb.DecryptDataKeyRequest(name=name, wrapped_data_key=wrapped)
        await assert_decrypt(broker, keys)  # the versions that unwrap are cached now
        set_usable(hsm_settings, "01", False)

        # Keys in the cache keep working until their TTL; a cold cache needs the master key.
        assert (await broker.stub.DecryptDataKey(request)).plaintext_data_key == plaintext
        broker.running.broker.keys.cache.clear()
        calls = (
            lambda: broker.stub.DecryptDataKey(request),
            lambda: broker.stub.GenerateDataKey(pb.GenerateDataKeyRequest(name=name)),
            lambda: broker.stub.CreateResource(pb.CreateResourceRequest(resource_id="new")),
        )
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call()
            assert_error(err.value, grpc.StatusCode.FAILED_PRECONDITION, "MASTER_KEY_UNAVAILABLE")
            assert err.value.details() == "the service master key is unavailable"
        assert await rows(broker.engine, "SELECT id FROM resources WHERE id = 'new'") == []

        set_usable(hsm_settings, "01", True)
        await asyncio.sleep(FAILURE_TTL.total_seconds() * 1.5)  # remembered failures expire
        assert (await broker.stub.DecryptDataKey(request)).plaintext_data_key == plaintext
        await broker.stub.CreateResource(pb.CreateResourceRequest(resource_id="new"))
        await assert_decrypt(broker, keys)

    # Switched off at start: the broker refuses to start, naming the key.
    set_usable(hsm_settings, "01", False)
    message = await refusal(hsm_settings)
    assert key_id(hsm_settings, "01") in message and "switched off" in message
    set_usable(hsm_settings, "01", True)
    async with running_broker(hsm_settings) as broker:
        await assert_decrypt(broker, keys)


@pytest.mark.asyncio
@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
async def test_incomplete_token_settings_are_refused(hsm_settings: Settings) -> None:
    message = await refusal(replace(hsm_settings, master_key_pkcs11_token="", pkcs11_module=""))
    assert "master_key_pkcs11_token" in message and "KEYBROKER_PKCS11_MODULE" in message
    message = await refusal(replace(hsm_settings, master_key_pkcs11_token="no-such-token"))
    assert "no-such-token" in message and "no token has this label" in message
    long_label = replace(hsm_settings, master_key_pkcs11_label="x" * 60)
    assert "choose a shorter master_key_pkcs11_label" in await refusal(long_label)


def test_token_aead_is_aes_gcm(softhsm_token: str) -> None:
    """The token's AES-GCM makes the bytes AESGCM makes, so sealed root keys have one format."""
    label, value = f"mk-{uuid.uuid4().hex[:12]}", os.urandom(32)
    softhsm.create_aes_key(softhsm_token, softhsm.PIN, label, b"\x07", value=value)
    keys = master_key_pkcs11.TokenKeys(softhsm.MODULE, softhsm.PIN, softhsm_token, label)
    assert keys.versions() == [b"\x07"]
    key = keys.check(b"\x07")
    assert key.key_id == f"pkcs11:{softhsm_token}/{label}/07"
    nonce, aad = os.urandom(12), b"associated"
    sealed = key.aead.encrypt(nonce, b"a root key", aad)
    assert sealed == AESGCM(value).encrypt(nonce, b"a root key", aad)
    assert key.aead.decrypt(nonce, sealed, aad) == b"a root key"
    for damaged in (sealed[:-1] + bytes([sealed[-1] ^ 1]), sealed[:16]):
        with pytest.raises(InvalidTag):
            key.aead.decrypt(nonce, damaged, aad)
    with pytest.raises(InvalidTag):
        key.aead.decrypt(nonce, sealed, b"other")
    assert master_key_pkcs11.next_version([b"\x01", b"\xff"]) == b"\x01\x00"
    assert master_key_pkcs11.next_version([b"\x01\x00", b"\xff"]) == b"\x01\x01"


@pytest.mark.asyncio
async def test_a_master_key_switched_off_turns_health_not_serving_until_it_opens_again(
    hsm_settings: Settings,
) -> None:
    """The background check (broker.keys.master_key_check), run here once instead of waiting for
    its interval: health and the name-less GetStatus follow the key, both ways."""
    async with running_broker(hsm_settings) as broker:
        b = broker.running.broker
        health: Any = health_pb2_grpc.HealthStub(broker.channel)
        request = health_pb2.HealthCheckRequest(service="keybroker.v1.KeyBroker")
        assert master_key_check.check_once(b.master, b.readiness)
        assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING

        set_usable(hsm_settings, "01", False)
        try:
            assert not master_key_check.check_once(b.master, b.readiness)
            await health_becomes(health, request, health_pb2.HealthCheckResponse.NOT_SERVING)
            status = await broker.stub.GetStatus(pb.GetStatusRequest())
            assert status.healthz == "master key unavailable"
        finally:
            set_usable(hsm_settings, "01", True)

        assert master_key_check.check_once(b.master, b.readiness)
        await health_becomes(health, request, health_pb2.HealthCheckResponse.SERVING)
        assert (await broker.stub.GetStatus(pb.GetStatusRequest())).healthz == "ok"


async def health_becomes(health: Any, request: Any, expected: int) -> None:
    """Health reaches `expected` (the server's health task applies a change within moments)."""
    seen = None
    for _ in range(200):
        seen = (await health.Check(request)).status
        if seen == expected:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"health stayed {seen}, expected {expected}")
