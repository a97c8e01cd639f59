"""The azure-keyvault root-key provider, driving the REAL azure-keyvault-keys SDK (and its
challenge authentication, pipeline and aiohttp transport) against a LOCAL STAND-IN of the Key
Vault REST contract over HTTPS (tests/azure_standin.py). It is not Azure: no emulator exists. The
stand-in's keys are real RSA and AES keys, and it counts the requests it answers, which is how
these tests see that wraps happen in the vault.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol, runtime_checkable

import pytest
import pytest_asyncio
from azure.keyvault.keys.crypto import KeyWrapAlgorithm
from azure.keyvault.keys.crypto.aio import CryptographyClient

from broker.providers import (
    KeyNotFound,
    KeyReference,
    KeyUnavailable,
    ProviderUnavailable,
    RootKeyProvider,
    UnsupportedKey,
    WrappedKeyInvalid,
)
from broker.providers.azure_keyvault import azure_keyvault_provider
from tests.azure_standin import KeyVaultStandIn, StandInKey, StaticTokenCredential

PLAINTEXT = bytes(range(0x40, 0x60))
# Frozen A256KW vectors of the wrapped format (format 1, algorithm 2), under the AES key
# 00 01 .. 1f: the vault's RFC 3394 result of the length-prefixed, zero-padded plaintext.
AES_KEY = bytes(range(32))
FROZEN_A256KW = {
    PLAINTEXT: bytes.fromhex(
        "01023c1b18dee186552db7ab0a6eee951586bc735dbd6982227991ba885b3cc2c0391af7a4801490c4b5d9"
        "01344289c34522"
    ),
    b"\xa5" * 5: bytes.fromhex("010236c4e85143cfe31a8c7f4d562322e61469caf77493be9b59"),
}


@runtime_checkable
class _Closable(Protocol):
    async def aclose(self) -> None: ...


@pytest_asyncio.fixture
async def vault(tmp_path: Path) -> AsyncIterator[KeyVaultStandIn]:
    async with KeyVaultStandIn(tmp_path) as standin:
        yield standin


@pytest.fixture
def credential() -> StaticTokenCredential:
    return StaticTokenCredential()


@pytest.fixture
def identities() -> list[str]:
    """The identities the provider asked a credential for, in order."""
    return []


@pytest_asyncio.fixture
async def provider(
    vault: KeyVaultStandIn, credential: StaticTokenCredential, identities: list[str]
) -> AsyncIterator[RootKeyProvider]:
    def credential_for(identity: str) -> StaticTokenCredential:
        identities.append(identity)
        return credential

    made = azure_keyvault_provider(
        credential_for=credential_for, connection_verify=str(vault.ca_file)
    )
    yield made
    assert isinstance(made, _Closable)
    await made.aclose()


def ref(vault: KeyVaultStandIn, key: StandInKey, version: str | None = None) -> KeyReference:
    """The reference to `key` (its latest version unless told; "" asks for the latest)."""
    chosen = key.latest.version if version is None else version
    return KeyReference("azure-keyvault", vault.url, key.name, chosen)


# ---------- round trips, in the vault ----------


@pytest.mark.asyncio
@pytest.mark.parametrize("hsm", [False, True], ids=["RSA", "RSA-HSM"])
async def test_rsa_round_trip_happens_in_the_vault(
    vault: KeyVaultStandIn, provider: RootKeyProvider, hsm: bool
) -> None:
    key = ref(vault, vault.add_rsa_key("rsa", hsm=hsm))
    wrapped = await provider.wrap(key, PLAINTEXT)
    assert wrapped[:2] == b"\x01\x01"
    assert len(wrapped) == 2 + 256
    assert PLAINTEXT not in wrapped
    assert await provider.unwrap(key, wrapped) == PLAINTEXT
    assert vault.calls["wrapkey"] == 1
    assert vault.calls["unwrapkey"] == 1


@pytest.mark.asyncio
async def test_rsa_wraps_are_randomised(vault: KeyVaultStandIn, provider: RootKeyProvider) -> None:
    key = ref(vault, vault.add_rsa_key("rsa"))
    assert await provider.wrap(key, PLAINTEXT) != await provider.wrap(key, PLAINTEXT)


@pytest.mark.asyncio
@pytest.mark.parametrize("length", [0, 1, 7, 8, 15, 16, 32, 127, 128])
async def test_oct_hsm_a256kw_round_trip(
    vault: KeyVaultStandIn, provider: RootKeyProvider, length: int
) -> None:
    key = ref(vault, vault.add_oct_key("aes"))
    plaintext = bytes([0xA5]) * length
    wrapped = await provider.wrap(key, plaintext)
    assert wrapped[:2] == b"\x01\x02"
    assert len(wrapped) == 2 + 8 + max(16, -(-(1 + length) // 8) * 8)
    assert await provider.unwrap(key, wrapped) == plaintext
    assert vault.calls["wrapkey"] == vault.calls["unwrapkey"] == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("plaintext", list(FROZEN_A256KW), ids=["32-bytes", "5-bytes"])
async def test_a256kw_format_frozen_vectors(
    vault: KeyVaultStandIn, provider: RootKeyProvider, plaintext: bytes
) -> None:
    key = ref(vault, vault.add_oct_key("aes", material=AES_KEY))
    assert await provider.wrap(key, plaintext) == FROZEN_A256KW[plaintext]
    assert await provider.unwrap(key, FROZEN_A256KW[plaintext]) == plaintext


@pytest.mark.asyncio
async def test_wrap_takes_at_most_128_bytes(
    vault: KeyVaultStandIn, provider: RootKeyProvider
) -> None:
    key = ref(vault, vault.add_rsa_key("rsa"))
    with pytest.raises(ValueError, match="128"):
        await provider.wrap(key, bytes(129))
    with pytest.raises(ValueError, match="version"):
        await provider.wrap(ref(vault, vault.keys["rsa"], ""), PLAINTEXT)
    assert vault.calls["wrapkey"] == 0


@pytest.mark.asyncio
async def test_the_sdk_alone_would_wrap_locally_even_with_a_disabled_key(
    vault: KeyVaultStandIn, credential: StaticTokenCredential
) -> None:
    """Why the provider forces remote operations: a CryptographyClient made from a key id
    fetches the RSA public key and then wraps with it locally, never asking the vault."""
    key = vault.add_rsa_key("rsa")
    key.latest.enabled = False
    key_id = f"{vault.url}/keys/rsa/{key.latest.version}"
    async with CryptographyClient(key_id, credential, connection_verify=str(vault.ca_file)) as sdk:
        result = await sdk.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, PLAINTEXT)
    assert result.encrypted_key
    assert vault.calls["wrapkey"] == 0


# ---------- describe ----------


@pytest.mark.asyncio
async def test_describe_rsa_latest_and_pinned_versions(
    vault: KeyVaultStandIn, provider: RootKeyProvider
) -> None:
    key = vault.add_rsa_key("rsa", versions=2)
    latest = await provider.describe(ref(vault, key, ""))
    assert latest.reference == ref(vault, key, key.versions[1].version)
    assert (latest.key_type, latest.key_size, latest.enabled, latest.recoverable) == (
        "RSA",
        2048,
        True,
        True,
    )
    pinned = await provider.describe(ref(vault, key, key.versions[0].version))
    assert pinned.reference.version == key.versions[0].version


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("level", "recoverable"),
    [
        ("Recoverable", True),
        ("CustomizedRecoverable+ProtectedSubscription", True),
        ("Recoverable+Purgeable", False),
        ("CustomizedRecoverable+Purgeable", False),
        ("Purgeable", False),
        (None, None),
    ],
)
async def test_describe_recoverable_means_soft_delete_and_purge_protection(
    vault: KeyVaultStandIn, provider: RootKeyProvider, level: str | None, recoverable: bool | None
) -> None:
    key = vault.add_rsa_key("rsa", recovery_level=level)
    assert (await provider.describe(ref(vault, key))).recoverable is recoverable


@pytest.mark.asyncio
async def test_describe_oct_hsm_key(vault: KeyVaultStandIn, provider: RootKeyProvider) -> None:
    description = await provider.describe(ref(vault, vault.add_oct_key("aes"), ""))
    # Managed HSM does not reveal an oct-HSM key's material or size: 0 means "not told".
    assert (description.key_type, description.key_size, description.enabled) == ("AES", 0, True)


@pytest.mark.asyncio
@pytest.mark.parametrize("state", ["disabled", "not yet valid", "expired"])
async def test_describe_reports_unusable_keys_as_not_enabled(
    vault: KeyVaultStandIn, provider: RootKeyProvider, state: str
) -> None:
    key = vault.add_rsa_key("rsa")
    _make_unusable(key, state)
    assert (await provider.describe(ref(vault, key))).enabled is False


@pytest.mark.asyncio
async def test_ec_keys_are_unsupported(vault: KeyVaultStandIn, provider: RootKeyProvider) -> None:
    key = ref(vault, vault.add_ec_key("ec"))
    with pytest.raises(UnsupportedKey):
        await provider.describe(key)
    with pytest.raises(UnsupportedKey):
        await provider.wrap(key, PLAINTEXT)
    assert vault.calls["wrapkey"] == 0


@pytest.mark.asyncio
async def test_a_key_that_may_not_wrap_is_unsupported(
    vault: KeyVaultStandIn, provider: RootKeyProvider
) -> None:
    key = ref(vault, vault.add_rsa_key("rsa", key_ops=("sign", "verify")))
    with pytest.raises(UnsupportedKey, match="wrapKey"):
        await provider.wrap(key, PLAINTEXT)
    assert vault.calls["wrapkey"] == 0


# ---------- revocation: disabled, validity window, forbidden, deleted ----------


@pytest.mark.asyncio
@pytest.mark.parametrize("state", ["disabled", "not yet valid", "expired"])
async def test_wrap_is_refused_before_the_vault_is_asked(
    vault: KeyVaultStandIn, provider: RootKeyProvider, state: str
) -> None:
    key = vault.add_rsa_key("rsa")
    _make_unusable(key, state)
    with pytest.raises(KeyUnavailable):
        await provider.wrap(ref(vault, key), PLAINTEXT)
    assert vault.calls["wrapkey"] == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("state", ["not yet valid", "expired"])
async def test_unwrap_works_outside_the_validity_window(
    vault: KeyVaultStandIn, provider: RootKeyProvider, state: str
) -> None:
    key = vault.add_oct_key("aes")
    wrapped = await provider.wrap(ref(vault, key), PLAINTEXT)
    _make_unusable(key, state)
    assert await provider.unwrap(ref(vault, key), wrapped) == PLAINTEXT
    # Within the provider's state-check window it is the vault that refuses the wrap.
    with pytest.raises(KeyUnavailable):
        await provider.wrap(ref(vault, key), PLAINTEXT)
    assert vault.calls["wrapkey"] == 2


@pytest.mark.asyncio
async def test_a_disabled_key_neither_wraps_nor_unwraps(
    vault: KeyVaultStandIn, provider: RootKeyProvider
) -> None:
    key = vault.add_rsa_key("rsa")
    wrapped = await provider.wrap(ref(vault, key), PLAINTEXT)
    key.latest.enabled = False
    with pytest.raises(KeyUnavailable, match="KeyDisabled"):
        await provider.unwrap(ref(vault, key), wrapped)
    with pytest.raises(KeyUnavailable, match="KeyDisabled"):
        await provider.wrap(ref(vault, key), PLAINTEXT)  # the vault's own 403
    with pytest.raises(KeyUnavailable, match="disabled"):
        await provider.wrap(ref(vault, key), PLAINTEXT)  # then the state is read again
    assert vault.calls["wrapkey"] == 2
    key.latest.enabled = True
    assert await provider.unwrap(ref(vault, key), wrapped) == PLAINTEXT


@pytest.mark.asyncio
async def test_key_operation_forbidden_is_unavailable(
    vault: KeyVaultStandIn, provider: RootKeyProvider
) -> None:
    key = vault.add_rsa_key("rsa")
    wrapped = await provider.wrap(ref(vault, key), PLAINTEXT)
    key.forbidden = True
    with pytest.raises(KeyUnavailable, match="KeyOperationForbidden"):
        await provider.wrap(ref(vault, key), PLAINTEXT)
    with pytest.raises(KeyUnavailable, match="KeyOperationForbidden"):
        await provider.unwrap(ref(vault, key), wrapped)


@pytest.mark.asyncio
async def test_an_identity_the_vault_rejects_is_unavailable(vault: KeyVaultStandIn) -> None:
    stranger = StaticTokenCredential(token="someone-else")
    provider = azure_keyvault_provider(
        credential_for=lambda identity: stranger, connection_verify=str(vault.ca_file)
    )
    key = ref(vault, vault.add_rsa_key("rsa"))
    try:
        with pytest.raises(KeyUnavailable, match="401"):
            await provider.describe(key)
        with pytest.raises(KeyUnavailable, match="401"):
            await provider.unwrap(key, b"\x01\x01" + bytes(256))
    finally:
        assert isinstance(provider, _Closable)
        await provider.aclose()
    assert stranger.closed


@pytest.mark.asyncio
async def test_deleted_and_unknown_keys_are_not_found(
    vault: KeyVaultStandIn, provider: RootKeyProvider
) -> None:
    key = vault.add_rsa_key("rsa")
    wrapped = await provider.wrap(ref(vault, key), PLAINTEXT)
    key.deleted = True
    with pytest.raises(KeyNotFound):
        await provider.describe(ref(vault, key))
    with pytest.raises(KeyNotFound):
        await provider.unwrap(ref(vault, key), wrapped)
    with pytest.raises(KeyNotFound):
        await provider.wrap(ref(vault, key), PLAINTEXT)
    key.deleted = False
    unknown_version = ref(vault, key, "0" * 32)
    with pytest.raises(KeyNotFound):
        await provider.wrap(unknown_version, PLAINTEXT)
    with pytest.raises(KeyNotFound):
        await provider.unwrap(unknown_version, wrapped)
    with pytest.raises(KeyNotFound):
        await provider.describe(KeyReference("azure-keyvault", vault.url, "nobody", ""))


# ---------- the vault cannot answer ----------


@pytest.mark.asyncio
async def test_throttling_is_provider_unavailable_without_sdk_retries(
    vault: KeyVaultStandIn, provider: RootKeyProvider
) -> None:
    key = vault.add_rsa_key("rsa")
    wrapped = await provider.wrap(ref(vault, key), PLAINTEXT)
    key.throttle(2)
    with pytest.raises(ProviderUnavailable, match="429"):
        await provider.unwrap(ref(vault, key), wrapped)
    with pytest.raises(ProviderUnavailable, match="429"):
        await provider.describe(ref(vault, key))
    assert vault.calls["throttled"] == 2
    assert await provider.unwrap(ref(vault, key), wrapped) == PLAINTEXT


@pytest.mark.asyncio
async def test_an_unreachable_vault_is_provider_unavailable(
    credential: StaticTokenCredential,
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = azure_keyvault_provider(credential_for=lambda identity: credential)
    key = KeyReference("azure-keyvault", f"https://127.0.0.1:{port}", "rsa", "1" * 32)
    try:
        with pytest.raises(ProviderUnavailable):
            await provider.unwrap(key, b"\x01\x01" + bytes(256))
        with pytest.raises(ProviderUnavailable):
            await provider.wrap(key, PLAINTEXT)
    finally:
        assert isinstance(provider, _Closable)
        await provider.aclose()


# ---------- what unwrap is given ----------


def _flip(index: int) -> Callable[[bytes], bytes]:
    def flip(wrapped: bytes) -> bytes:
        changed = bytearray(wrapped)
        changed[index] ^= 0x01
        return bytes(changed)

    return flip


TAMPERINGS: dict[str, Callable[[bytes], bytes]] = {
    "flipped first vault byte": _flip(2),
    "flipped last byte": _flip(-1),
    "truncated": lambda w: w[:-8],
    "extended": lambda w: w + bytes(8),
    "format 2": lambda w: b"\x02" + w[1:],
    "unknown algorithm": lambda w: w[:1] + b"\x09" + w[2:],
    "other algorithm": lambda w: w[:1] + bytes([3 - w[1]]) + w[2:],
    "header only": lambda w: w[:2],
    "empty": lambda w: b"",
    "oversized": lambda w: w[:2] + bytes(4096),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["rsa", "aes"])
@pytest.mark.parametrize("tampering", list(TAMPERINGS))
async def test_tampered_wrapped_keys_do_not_open(
    vault: KeyVaultStandIn, provider: RootKeyProvider, kind: str, tampering: str
) -> None:
    key = ref(vault, vault.add_rsa_key(kind) if kind == "rsa" else vault.add_oct_key(kind))
    wrapped = await provider.wrap(key, PLAINTEXT)
    with pytest.raises(WrappedKeyInvalid) as caught:
        await provider.unwrap(key, TAMPERINGS[tampering](wrapped))
    assert str(caught.value) == "the wrapped key does not open under this key"


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["rsa", "aes"])
async def test_wrapped_under_one_version_does_not_open_under_another(
    vault: KeyVaultStandIn, provider: RootKeyProvider, kind: str
) -> None:
    key = (
        vault.add_rsa_key(kind, versions=2)
        if kind == "rsa"
        else vault.add_oct_key(kind, versions=2)
    )
    wrapped = await provider.wrap(ref(vault, key, key.versions[0].version), PLAINTEXT)
    with pytest.raises(WrappedKeyInvalid):
        await provider.unwrap(ref(vault, key, key.versions[1].version), wrapped)


# ---------- clients, identities, state checks ----------


@pytest.mark.asyncio
async def test_challenge_identity_and_cached_state(
    vault: KeyVaultStandIn,
    provider: RootKeyProvider,
    credential: StaticTokenCredential,
    identities: list[str],
) -> None:
    key = vault.add_rsa_key("rsa")
    as_app = ref(vault, key)
    as_identity = KeyReference(
        "azure-keyvault", vault.url, "rsa", key.latest.version, "client-id-1"
    )
    for reference in (as_app, as_app, as_app, as_identity):
        assert (
            await provider.unwrap(reference, await provider.wrap(reference, PLAINTEXT)) == PLAINTEXT
        )
    # One credential per identity; the key's state is read once per identity and window.
    assert identities == ["", "client-id-1"]
    assert vault.calls["get"] == 2
    assert vault.calls["wrapkey"] == vault.calls["unwrapkey"] == 4
    # The SDK's bearer challenge: the scope comes from the vault's challenge, tenant included.
    assert credential.requests
    assert set(credential.requests) == {((f"{vault.resource}/.default",), vault.tenant)}
    assert vault.calls["challenge"] >= 1


@pytest.mark.asyncio
async def test_closed_provider_refuses_work(
    vault: KeyVaultStandIn, credential: StaticTokenCredential
) -> None:
    provider = azure_keyvault_provider(
        credential_for=lambda identity: credential, connection_verify=str(vault.ca_file)
    )
    key = ref(vault, vault.add_rsa_key("rsa"))
    await provider.describe(key)
    assert isinstance(provider, _Closable)
    await provider.aclose()
    assert credential.closed
    with pytest.raises(RuntimeError, match="closed"):
        await provider.describe(key)


@pytest.mark.asyncio
async def test_vault_must_be_an_https_url(provider: RootKeyProvider) -> None:
    for vault_url in ("http://127.0.0.1:1", "https://127.0.0.1:1/path"):
        with pytest.raises(ValueError, match="https"):
            await provider.describe(KeyReference("azure-keyvault", vault_url, "rsa", ""))


def _make_unusable(key: StandInKey, state: str) -> None:
    now = datetime.now(UTC)
    if state == "disabled":
        key.latest.enabled = False
    elif state == "not yet valid":
        key.latest.not_before = now + timedelta(days=1)
    else:
        key.latest.expires = now - timedelta(seconds=1)
