"""The PKCS#11 provider against a real SoftHSM2 token: round trips, the wrapped format, refusals
of unsuitable keys, damaged wrapped keys, revocation in the token and back, unknown names, and
concurrent use. SoftHSM 2.6 offers RSA-OAEP with SHA-1 only, so RSA keys are tested with
allow_oaep_sha1=True, and refused without it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, GCMParams, Mechanism

from broker.providers import (
    KeyNotFound,
    KeyReference,
    KeyUnavailable,
    ProviderUnavailable,
    RootKeyProvider,
    UnsupportedKey,
    WrappedKeyInvalid,
)
from broker.providers.pkcs11 import pkcs11_provider
from tests import softhsm

TOKEN, PIN = softhsm.TOKEN, softhsm.PIN

# Known answer: an imported AES-256 key and a wrapped key made independently with `cryptography`
# (AESGCM(KNOWN_KEY).encrypt(KNOWN_IV, KNOWN_PLAINTEXT, b"keybroker/pkcs11/v1" + key id)).
KNOWN_LABEL, KNOWN_VERSION = "known-answer", "4b01"
KNOWN_KEY = bytes(range(32))
KNOWN_IV = bytes(range(100, 112))
KNOWN_PLAINTEXT = b"frozen data key: 32 bytes long!!"
KNOWN_WRAPPED = bytes.fromhex(
    "0101"
    "6465666768696a6b6c6d6e6f"
    "2e69b11c1c8776fa5f163ec8b10013c762f1342ae9158717d4f1c02795c48469"
    "74bacc77e08202a483176e4983450d35"
)


@dataclass(frozen=True)
class Hsm:
    imported_rsa: rsa.RSAPrivateKey
    """The private half of the key imported as "rsa-imported"/01, for interoperability."""


@pytest.fixture(scope="module")
def hsm(softhsm_token: str) -> Hsm:
    """The keys most tests of this module share, in the session's token; tests that change a
    key make their own."""
    softhsm.create_aes_key(TOKEN, PIN, "aes", bytes.fromhex("01ff"))
    softhsm.create_aes_key(TOKEN, PIN, "aes", bytes.fromhex("02"))
    softhsm.create_aes_key(TOKEN, PIN, KNOWN_LABEL, bytes.fromhex(KNOWN_VERSION), value=KNOWN_KEY)
    softhsm.create_aes_key(TOKEN, PIN, "aes128", b"\x01", bits=128)
    softhsm.create_rsa_key(TOKEN, PIN, "rsa", b"\x01", 2048)
    softhsm.create_rsa_key(TOKEN, PIN, "rsa3072", b"\x01", 3072)
    softhsm.create_rsa_key(TOKEN, PIN, "rsa1024", b"\x01", 1024)
    softhsm.create_ec_key(TOKEN, PIN, "ec", b"\x01")
    imported = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    softhsm.import_rsa_key(TOKEN, PIN, "rsa-imported", b"\x01", imported)
    return Hsm(imported_rsa=imported)


@pytest.fixture
def provider(hsm: Hsm) -> RootKeyProvider:
    return pkcs11_provider(softhsm.MODULE, PIN, allow_oaep_sha1=True)


@pytest.fixture
def strict_provider(hsm: Hsm) -> RootKeyProvider:
    """The default configuration: RSA-OAEP with SHA-256 or nothing."""
    return pkcs11_provider(softhsm.MODULE, PIN)


def ref(label: str, version: str = "", token: str = TOKEN) -> KeyReference:
    return KeyReference(provider="pkcs11", vault=token, key_name=label, version=version)


AES = ref("aes", "02")
RSA = ref("rsa", "01")


def fresh_label(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


@pytest.mark.asyncio
async def test_aes_round_trip(provider: RootKeyProvider) -> None:
    plaintext = os.urandom(32)
    wrapped = await provider.wrap(AES, plaintext)
    assert wrapped[:2] == b"\x01\x01"  # format 1, AES-256-GCM
    assert len(wrapped) == 2 + 12 + len(plaintext) + 16
    assert plaintext not in wrapped
    assert await provider.unwrap(AES, wrapped) == plaintext
    again = await provider.wrap(AES, plaintext)
    assert again[2:14] != wrapped[2:14]  # a fresh IV each time
    assert await provider.unwrap(AES, again) == plaintext
    empty = await provider.wrap(AES, b"")
    assert await provider.unwrap(AES, empty) == b""


@pytest.mark.asyncio
async def test_aes_known_answer(provider: RootKeyProvider) -> None:
    """Pins the wrapped format: the provider unwraps a frozen vector made outside the token, and
    what it wraps opens with AES-GCM under the documented IV position and associated data."""
    key = ref(KNOWN_LABEL, KNOWN_VERSION)
    assert await provider.unwrap(key, KNOWN_WRAPPED) == KNOWN_PLAINTEXT
    wrapped = await provider.wrap(key, KNOWN_PLAINTEXT)
    aad = b"keybroker/pkcs11/v1" + key.key_id.encode()
    assert key.key_id == "pkcs11:kb-test/known-answer/4b01"
    assert AESGCM(KNOWN_KEY).decrypt(wrapped[2:14], wrapped[14:], aad) == KNOWN_PLAINTEXT


@pytest.mark.asyncio
async def test_rsa_round_trip_with_oaep_sha1(provider: RootKeyProvider) -> None:
    plaintext = os.urandom(32)
    wrapped = await provider.wrap(RSA, plaintext)
    assert wrapped[:2] == b"\x01\x03"  # format 1, RSA-OAEP-SHA1 (all SoftHSM 2.6 offers)
    assert len(wrapped) == 2 + 2048 // 8
    assert plaintext not in wrapped
    assert await provider.unwrap(RSA, wrapped) == plaintext
    assert await provider.wrap(RSA, plaintext) != wrapped  # OAEP is randomised


@pytest.mark.asyncio
async def test_rsa_interoperates_with_standard_oaep(provider: RootKeyProvider, hsm: Hsm) -> None:
    """After the header comes a plain RSA-OAEP ciphertext: other software opens it and makes it."""
    key = ref("rsa-imported", "01")
    sha1 = hashes.SHA1()  # noqa: S303 - OAEP-SHA1, the only OAEP SoftHSM 2.6 offers
    oaep = padding.OAEP(mgf=padding.MGF1(sha1), algorithm=sha1, label=None)
    plaintext = os.urandom(32)
    wrapped = await provider.wrap(key, plaintext)
    assert hsm.imported_rsa.decrypt(wrapped[2:], oaep) == plaintext
    outside = b"\x01\x03" + hsm.imported_rsa.public_key().encrypt(plaintext, oaep)
    assert await provider.unwrap(key, outside) == plaintext


@pytest.mark.asyncio
async def test_rsa_refused_without_oaep_sha1(
    strict_provider: RootKeyProvider, provider: RootKeyProvider
) -> None:
    with pytest.raises(UnsupportedKey, match="allow OAEP-SHA1 explicitly"):
        await strict_provider.wrap(RSA, os.urandom(32))
    wrapped = await provider.wrap(RSA, os.urandom(32))
    with pytest.raises(UnsupportedKey, match="allow OAEP-SHA1 explicitly"):
        await strict_provider.unwrap(RSA, wrapped)
    # AES keys do not depend on that setting.
    plaintext = os.urandom(32)
    assert (
        await strict_provider.unwrap(AES, await strict_provider.wrap(AES, plaintext)) == plaintext
    )


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("label", "reason"),
    [("aes128", "AES-128"), ("rsa1024", "RSA-1024"), ("ec", "KeyType.EC")],
)
async def test_unsuitable_keys_are_refused(
    provider: RootKeyProvider, label: str, reason: str
) -> None:
    key = ref(label, "01")
    with pytest.raises(UnsupportedKey, match=reason):
        await provider.describe(key)
    with pytest.raises(UnsupportedKey, match=reason):
        await provider.wrap(key, os.urandom(32))
    with pytest.raises(UnsupportedKey, match=reason):
        await provider.unwrap(key, b"\x01\x01" + os.urandom(60))


@pytest.mark.asyncio
async def test_describe(strict_provider: RootKeyProvider) -> None:
    latest = await strict_provider.describe(ref("aes"))
    # The latest version is the greatest CKA_ID as bytes: 02 > 01ff (as integers it would not be).
    assert latest.reference == AES
    assert (latest.key_type, latest.key_size, latest.enabled) == ("AES", 256, True)
    assert latest.recoverable is None
    older = await strict_provider.describe(ref("aes", "01ff"))
    assert older.reference.version == "01ff"
    rsa2048 = await strict_provider.describe(ref("rsa"))
    assert (rsa2048.reference, rsa2048.key_type, rsa2048.key_size) == (RSA, "RSA", 2048)
    assert rsa2048.enabled
    rsa3072 = await strict_provider.describe(ref("rsa3072", "01"))
    assert (rsa3072.key_type, rsa3072.key_size) == ("RSA", 3072)


@pytest.mark.asyncio
async def test_other_key_or_version_does_not_unwrap(provider: RootKeyProvider) -> None:
    wrapped = await provider.wrap(ref("aes", "01ff"), os.urandom(32))
    with pytest.raises(WrappedKeyInvalid):
        await provider.unwrap(AES, wrapped)
    with pytest.raises(WrappedKeyInvalid):
        await provider.unwrap(ref(KNOWN_LABEL, KNOWN_VERSION), wrapped)
    with pytest.raises(WrappedKeyInvalid):
        await provider.unwrap(ref("rsa-imported", "01"), await provider.wrap(RSA, os.urandom(32)))


Mutation = Callable[[bytes], bytes]


def flip(index: int) -> Mutation:
    def mutate(data: bytes) -> bytes:
        out = bytearray(data)
        out[index] ^= 0x01
        return bytes(out)

    return mutate


def put(index: int, value: int) -> Mutation:
    def mutate(data: bytes) -> bytes:
        out = bytearray(data)
        out[index] = value
        return bytes(out)

    return mutate


COMMON_DAMAGE: dict[str, Mutation] = {
    "format version 0": put(0, 0),
    "format version 2": put(0, 2),
    "mechanism 0": put(1, 0),
    "mechanism 255": put(1, 255),
    "empty": lambda w: b"",
    "one byte": lambda w: w[:1],
    "header only": lambda w: w[:2],
    "last byte cut": lambda w: w[:-1],
    "byte appended": lambda w: w + b"\x00",
}
AES_DAMAGE: dict[str, Mutation] = {
    **COMMON_DAMAGE,
    "IV bit": flip(2),
    "IV last bit": flip(13),
    "ciphertext bit": flip(14),
    "tag bit": flip(-1),
    "tag first bit": flip(-16),
    "mechanism RSA-OAEP-SHA256": put(1, 2),
    "mechanism RSA-OAEP-SHA1": put(1, 3),
    "tag removed": lambda w: w[:-16],
    "IV only": lambda w: w[:14],
}
RSA_DAMAGE: dict[str, Mutation] = {
    **COMMON_DAMAGE,
    "ciphertext first bit": flip(2),
    "ciphertext last bit": flip(-1),
    "mechanism AES-GCM": put(1, 1),
    # SoftHSM has no OAEP-SHA256, so it cannot have made this: damaged, not unsupported.
    "mechanism RSA-OAEP-SHA256": put(1, 2),
}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("key", "mutate"),
    [pytest.param(AES, m, id=f"AES {name}") for name, m in AES_DAMAGE.items()]
    + [pytest.param(RSA, m, id=f"RSA {name}") for name, m in RSA_DAMAGE.items()],
)
async def test_damaged_wrapped_key_is_invalid(
    provider: RootKeyProvider, key: KeyReference, mutate: Mutation
) -> None:
    plaintext = os.urandom(32)
    wrapped = await provider.wrap(key, plaintext)
    with pytest.raises(WrappedKeyInvalid) as caught:
        await provider.unwrap(key, mutate(wrapped))
    assert str(caught.value) == "the wrapped key does not authenticate under this key version"
    assert await provider.unwrap(key, wrapped) == plaintext  # the provider is still fine


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["AES", "RSA"])
async def test_revoked_in_the_token_then_restored(provider: RootKeyProvider, kind: str) -> None:
    label, key_id = fresh_label(kind.lower()), b"\x07"
    if kind == "AES":
        softhsm.create_aes_key(TOKEN, PIN, label, key_id)
    else:
        softhsm.create_rsa_key(TOKEN, PIN, label, key_id, 2048)
    key = ref(label, key_id.hex())
    plaintext = os.urandom(32)
    wrapped = await provider.wrap(key, plaintext)

    softhsm.set_key_usable(TOKEN, PIN, label, key_id, usable=False)
    with pytest.raises(KeyUnavailable) as on_wrap:
        await provider.wrap(key, plaintext)
    with pytest.raises(KeyUnavailable) as on_unwrap:
        await provider.unwrap(key, wrapped)
    assert type(on_wrap.value) is type(on_unwrap.value) is KeyUnavailable  # not KeyNotFound
    assert not (await provider.describe(key)).enabled

    softhsm.set_key_usable(TOKEN, PIN, label, key_id, usable=True)
    assert (await provider.describe(key)).enabled
    assert await provider.unwrap(key, wrapped) == plaintext
    assert await provider.unwrap(key, await provider.wrap(key, plaintext)) == plaintext


def test_disabled_key_error_is_what_the_provider_expects(hsm: Hsm) -> None:
    """python-pkcs11 0.10 has no class for CKR_KEY_FUNCTION_NOT_PERMITTED; the provider
    recognises it by its text when a key is switched off between lookup and use. Pin that."""
    label = fresh_label("race")
    softhsm.create_aes_key(TOKEN, PIN, label, b"\x01")
    with softhsm.open_session(TOKEN, PIN) as session:
        key = session.get_key(label=label)
        assert isinstance(key, pkcs11.types.EncryptMixin)
        key[Attribute.ENCRYPT] = False
        with pytest.raises(pkcs11.PKCS11Error) as caught:
            key.encrypt(b"x", mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(bytes(12)))
    assert type(caught.value) is pkcs11.PKCS11Error
    assert str(caught.value) == "Unmapped error code 0x68"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "key",
    [
        ref("aes", "02", token="no-such-token"),
        ref("no-such-key", "01"),
        ref("aes", "ff"),
        ref("aes", "0102"),
        ref("aes", "XYZ"),
        ref("aes", "0A"),  # versions are lower-case hex
        ref("aes", "2"),
        ref("", "01"),
    ],
    ids=lambda k: k.key_id,
)
async def test_unknown_token_key_or_version(provider: RootKeyProvider, key: KeyReference) -> None:
    with pytest.raises(KeyNotFound):
        await provider.describe(key)
    with pytest.raises(KeyNotFound):
        await provider.wrap(key, os.urandom(32))
    with pytest.raises(KeyNotFound):
        await provider.unwrap(key, b"\x01\x01" + os.urandom(60))


@pytest.mark.asyncio
async def test_unknown_label_has_no_latest_version(provider: RootKeyProvider) -> None:
    with pytest.raises(KeyNotFound):
        await provider.describe(ref("no-such-key"))
    with pytest.raises(KeyNotFound):
        await provider.describe(ref("aes", token="no-such-token"))


@pytest.mark.asyncio
async def test_missing_module_is_provider_unavailable(tmp_path: Path) -> None:
    missing = pkcs11_provider(str(tmp_path / "libnothing.so"), PIN)
    with pytest.raises(ProviderUnavailable):
        await missing.describe(AES)


@pytest.mark.asyncio
async def test_concurrent_calls_from_two_providers(provider: RootKeyProvider) -> None:
    """64 concurrent wrap+unwrap pairs over two providers (two worker threads) and both key
    types: the process-wide lock keeps the module single-threaded, so none fails."""
    other = pkcs11_provider(softhsm.MODULE, PIN, allow_oaep_sha1=True)

    async def pair(i: int) -> bool:
        p = (provider, other)[i % 2]
        key = (AES, RSA)[(i // 2) % 2]
        plaintext = os.urandom(32)
        return await p.unwrap(key, await p.wrap(key, plaintext)) == plaintext

    assert await asyncio.gather(*(pair(i) for i in range(64))) == [True] * 64


@pytest.mark.asyncio
async def test_errors_hold_no_secrets(
    provider: RootKeyProvider, strict_provider: RootKeyProvider
) -> None:
    plaintext = os.urandom(32)
    wrapped = await provider.wrap(AES, plaintext)
    failures = [
        provider.unwrap(AES, flip(20)(wrapped)),
        provider.unwrap(ref("aes", "01ff"), wrapped),
        strict_provider.wrap(RSA, plaintext),
        provider.wrap(ref("aes128", "01"), plaintext),
        provider.wrap(ref("nothing", "01"), plaintext),
        provider.wrap(ref("aes", "02", token="none"), plaintext),
    ]
    for failure in failures:
        with pytest.raises(Exception) as caught:  # noqa: PT011 - each of them, checked below
            await failure
        assert isinstance(caught.value, KeyUnavailable | UnsupportedKey | WrappedKeyInvalid)
        text = f"{caught.value} {caught.value.__cause__!r}"
        for secret in (PIN, plaintext.hex(), repr(plaintext), KNOWN_KEY.hex()):
            assert secret not in text
