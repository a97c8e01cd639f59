"""Known-answer tests: the wire and storage formats, pinned by frozen vectors.

Every hex literal below was produced once with the code of the day and pasted in; nothing here
regenerates them. A change that breaks one of these tests breaks data already stored (sealed
keys in SQL, wrapped data keys held by callers, master key files on disk): it needs a new format
version, not new vectors.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESGCMSIV

from broker.core.errors import ConfigurationError, DecryptionFailed, InvalidArgument
from broker.core.names import parse_object
from broker.keys import associated_data, data_key_format, key_wrapping, master_key


def flipped(data: bytes, bit: int) -> bytes:
    """`data` with bit number `bit` (0 = lowest bit of byte 0) inverted."""
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# -- associated data ---------------------------------------------------------------------------

AD_VECTORS: list[tuple[tuple[bytes, ...], str]] = [
    ((), ""),
    ((b"",), "00000000"),
    ((b"ab", b"c"), "0000000261620000000163"),
    ((b"a", b"bc"), "0000000161000000026263"),
    ((b"keybroker", b"", b"\x00\xff"), "000000096b657962726f6b6572000000000000000200ff"),
]


@pytest.mark.parametrize(("fields", "expected"), AD_VECTORS)
def test_associated_data_known_answers(fields: tuple[bytes, ...], expected: str) -> None:
    assert associated_data.encode(*fields).hex() == expected


def test_associated_data_is_unambiguous() -> None:
    assert associated_data.encode(b"ab", b"c") != associated_data.encode(b"a", b"bc")
    assert associated_data.encode(b"abc") != associated_data.encode(b"ab", b"c")
    assert associated_data.encode(b"", b"a") != associated_data.encode(b"a", b"")
    assert associated_data.encode(b"a") != associated_data.encode(b"a", b"")


# -- sealed keys -------------------------------------------------------------------------------

SEAL_KEK = bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
SEALED_PLAINTEXT = bytes.fromhex("404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f")
SEAL_LABEL = b"resource-key"
SEAL_CONTEXT = (b"resources/r1", b"models", b"1")
SEALED = bytes.fromhex(
    "017bd0899178098f6770ed1cff08df3c1038b674c932b8da48263d0e6948f983fd"
    "28ee99827387226f3a6a48a54479cdd773004efba16b14e73234c385"
)


def test_sealed_key_known_answer() -> None:
    assert len(SEALED) == 1 + 12 + 32 + 16
    assert SEALED[0] == 0x01
    assert (
        key_wrapping.unwrap(AESGCM(SEAL_KEK), SEALED, SEAL_LABEL, SEAL_CONTEXT) == SEALED_PLAINTEXT
    )


@pytest.mark.parametrize(
    ("label", "context"),
    [
        (b"root-key", SEAL_CONTEXT),
        (b"", SEAL_CONTEXT),
        (SEAL_LABEL, (b"resources/r2", b"models", b"1")),
        (SEAL_LABEL, (b"resources/r1", b"results", b"1")),
        (SEAL_LABEL, (b"resources/r1", b"models", b"2")),
        (SEAL_LABEL, (b"resources/r1", b"models1")),
        (SEAL_LABEL, (b"resources/r1", b"models")),
        (SEAL_LABEL, (*SEAL_CONTEXT, b"")),
        (SEAL_LABEL, ()),
        (b"resource-keyresources/r1", (b"models", b"1")),
    ],
)
def test_sealed_key_refuses_other_label_or_context(
    label: bytes, context: tuple[bytes, ...]
) -> None:
    with pytest.raises(key_wrapping.UnwrapError):
        key_wrapping.unwrap(AESGCM(SEAL_KEK), SEALED, label, context)


def test_sealed_key_refuses_other_kek() -> None:
    other = bytearray(SEAL_KEK)
    other[-1] ^= 1
    with pytest.raises(key_wrapping.UnwrapError):
        key_wrapping.unwrap(AESGCM(bytes(other)), SEALED, SEAL_LABEL, SEAL_CONTEXT)


def test_sealed_key_refuses_every_flipped_bit() -> None:
    kek = AESGCM(SEAL_KEK)
    for bit in range(len(SEALED) * 8):
        with pytest.raises(key_wrapping.UnwrapError):
            key_wrapping.unwrap(kek, flipped(SEALED, bit), SEAL_LABEL, SEAL_CONTEXT)


@pytest.mark.parametrize("version", [0x00, 0x02, 0x81, 0xFF])
def test_sealed_key_refuses_other_format_versions(version: int) -> None:
    with pytest.raises(key_wrapping.UnwrapError):
        key_wrapping.unwrap(
            AESGCM(SEAL_KEK), bytes([version]) + SEALED[1:], SEAL_LABEL, SEAL_CONTEXT
        )


def test_sealed_key_refuses_truncated_and_extended() -> None:
    kek = AESGCM(SEAL_KEK)
    for length in range(len(SEALED)):
        with pytest.raises(key_wrapping.UnwrapError):
            key_wrapping.unwrap(kek, SEALED[:length], SEAL_LABEL, SEAL_CONTEXT)
    with pytest.raises(key_wrapping.UnwrapError):
        key_wrapping.unwrap(kek, SEALED + b"\x00", SEAL_LABEL, SEAL_CONTEXT)


# -- wrapped data keys (version 1) -------------------------------------------------------------

RESOURCE_KEY = bytes.fromhex("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
DATA_KEY = bytes.fromhex("c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf")
OBJECT = "resources/r1/models/m1"
KEY_VERSION = 7
CALLER_AD = b"caller-ctx"
WRAPPED = bytes.fromhex(
    "01000000076908ecceaed99e9d8c6415019f88901eb3fef8feb110e190c404453f"
    "c77be9e21fad2eabc57c77bb49c107baa0616b1c4861f2b33647eee51a7f3b26"
)


def test_wrapped_data_key_layout() -> None:
    assert len(WRAPPED) == 65 == data_key_format.WRAPPED_SIZE
    assert WRAPPED[0] == 1
    assert struct.unpack(">I", WRAPPED[1:5]) == (KEY_VERSION,)
    assert WRAPPED[1:5] == bytes.fromhex("00000007")
    parsed = data_key_format.parse(WRAPPED)
    assert parsed.version == KEY_VERSION
    assert parsed.raw == WRAPPED


def test_wrapped_data_key_known_answer() -> None:
    parsed = data_key_format.parse(WRAPPED)
    plaintext = data_key_format.unwrap(
        AESGCMSIV(RESOURCE_KEY), parsed, parse_object(OBJECT), CALLER_AD
    )
    assert plaintext == DATA_KEY


@pytest.mark.parametrize(
    ("name", "caller_ad"),
    [
        ("resources/r1/models/m2", CALLER_AD),
        ("resources/r1/models/M1", CALLER_AD),
        ("resources/r2/models/m1", CALLER_AD),
        ("resources/r1/analyzeResults/m1", CALLER_AD),
        (OBJECT, b""),
        (OBJECT, b"caller-ctx\x00"),
        (OBJECT, b"Caller-ctx"),
    ],
)
def test_wrapped_data_key_is_bound_to_name_and_associated_data(name: str, caller_ad: bytes) -> None:
    parsed = data_key_format.parse(WRAPPED)
    with pytest.raises(DecryptionFailed):
        data_key_format.unwrap(AESGCMSIV(RESOURCE_KEY), parsed, parse_object(name), caller_ad)


@pytest.mark.parametrize("version", [1, 6, 8, 0x00010007, 0xFFFFFFFF])
def test_wrapped_data_key_is_bound_to_its_version(version: int) -> None:
    retargeted = WRAPPED[:1] + struct.pack(">I", version) + WRAPPED[5:]
    parsed = data_key_format.parse(retargeted)
    assert parsed.version == version
    with pytest.raises(DecryptionFailed):
        data_key_format.unwrap(AESGCMSIV(RESOURCE_KEY), parsed, parse_object(OBJECT), CALLER_AD)


def test_wrapped_data_key_refuses_other_resource_key() -> None:
    other = bytearray(RESOURCE_KEY)
    other[0] ^= 0x80
    with pytest.raises(DecryptionFailed):
        data_key_format.unwrap(
            AESGCMSIV(bytes(other)), data_key_format.parse(WRAPPED), parse_object(OBJECT), CALLER_AD
        )


def test_wrapped_data_key_refuses_every_flipped_bit() -> None:
    aead, obj = AESGCMSIV(RESOURCE_KEY), parse_object(OBJECT)
    for bit in range(len(WRAPPED) * 8):
        damaged = flipped(WRAPPED, bit)
        if bit < 8:
            with pytest.raises(InvalidArgument) as err:
                data_key_format.parse(damaged)
            assert err.value.reason == "UNSUPPORTED_FORMAT_VERSION"
            continue
        with pytest.raises(DecryptionFailed):
            data_key_format.unwrap(aead, data_key_format.parse(damaged), obj, CALLER_AD)


def test_wrapped_data_key_parse_errors() -> None:
    with pytest.raises(InvalidArgument) as err:
        data_key_format.parse(b"")
    assert err.value.reason == "MISSING_FIELD"
    with pytest.raises(InvalidArgument) as err:
        data_key_format.parse(b"\x01" * 1025)
    assert err.value.reason == "FIELD_TOO_LONG"
    for version in (0x00, 0x02, 0xFF):
        with pytest.raises(InvalidArgument) as err:
            data_key_format.parse(bytes([version]) + WRAPPED[1:])
        assert err.value.reason == "UNSUPPORTED_FORMAT_VERSION"
    for length in range(1, len(WRAPPED)):
        with pytest.raises(DecryptionFailed):
            data_key_format.parse(WRAPPED[:length])
    for extra in (WRAPPED + b"\x00", WRAPPED + WRAPPED, b"\x01" * 1024):
        with pytest.raises(DecryptionFailed):
            data_key_format.parse(extra)
    with pytest.raises(DecryptionFailed):
        data_key_format.parse(WRAPPED[:1] + bytes(4) + WRAPPED[5:])


# -- master key file ---------------------------------------------------------------------------

MASTER_KEY_ID = bytes.fromhex("101112131415161718191a1b1c1d1e1f")
MASTER_KEY = bytes.fromhex("e0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
MASTER_KEY_FILE = bytes.fromhex(
    "4b424d4b01101112131415161718191a1b1c1d1e1fe0e1e2e3e4e5e6e7e8e9eaeb"
    "ecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff03cb254f1231841ee51ed7da48"
    "cd99a368840c2dd06765f4ebe28ab1cf83fbe2"
)
MASTER_PATH = Path("/nonexistent/master.key")


def test_master_key_file_known_answer() -> None:
    assert len(MASTER_KEY_FILE) == 85 == master_key.FILE_SIZE
    assert MASTER_KEY_FILE[:5] == b"KBMK\x01"
    assert MASTER_KEY_FILE[5:21] == MASTER_KEY_ID
    assert MASTER_KEY_FILE[21:53] == MASTER_KEY
    decoded = master_key.decode_file(MASTER_KEY_FILE, MASTER_PATH)
    assert decoded.key_id == "masterKeys/101112131415161718191a1b1c1d1e1f"
    # The decoded AEAD is keyed with the file's key, not with anything derived from it.
    nonce = bytes(12)
    assert AESGCM(MASTER_KEY).decrypt(nonce, decoded.aead.encrypt(nonce, b"x", b""), b"") == b"x"
    assert master_key.encode_file(MASTER_KEY_ID, MASTER_KEY) == MASTER_KEY_FILE


def test_master_key_file_refuses_every_flipped_bit() -> None:
    for bit in range(len(MASTER_KEY_FILE) * 8):
        with pytest.raises(ConfigurationError):
            master_key.decode_file(flipped(MASTER_KEY_FILE, bit), MASTER_PATH)


def test_master_key_file_refuses_truncated_and_extended() -> None:
    for length in range(len(MASTER_KEY_FILE)):
        with pytest.raises(ConfigurationError):
            master_key.decode_file(MASTER_KEY_FILE[:length], MASTER_PATH)
    with pytest.raises(ConfigurationError):
        master_key.decode_file(MASTER_KEY_FILE + b"\n", MASTER_PATH)


def test_master_key_errors_do_not_show_the_key() -> None:
    for bit in (0, 8 * 30, 8 * 60):
        with pytest.raises(ConfigurationError) as err:
            master_key.decode_file(flipped(MASTER_KEY_FILE, bit), MASTER_PATH)
        assert MASTER_KEY.hex() not in str(err.value)
        assert MASTER_KEY_FILE.hex()[:16] not in str(err.value)


# -- round trips with fresh randomness ---------------------------------------------------------


def test_seal_round_trip_with_fresh_randomness() -> None:
    kek = AESGCM(AESGCM.generate_key(bit_length=256))
    key = os.urandom(32)
    context = (b"resources/x", b"results", b"3")
    a = key_wrapping.wrap(kek, key, b"resource-key", context)
    b = key_wrapping.wrap(kek, key, b"resource-key", context)
    assert a != b
    assert len(a) == len(b) == 61
    assert key not in a
    assert key_wrapping.unwrap(kek, a, b"resource-key", context) == key
    assert key_wrapping.unwrap(kek, b, b"resource-key", context) == key
    with pytest.raises(key_wrapping.UnwrapError):
        key_wrapping.unwrap(kek, a, b"root-key", context)


def test_wrap_round_trip_with_fresh_randomness() -> None:
    aead = AESGCMSIV(AESGCMSIV.generate_key(bit_length=256))
    key = os.urandom(data_key_format.DATA_KEY_SIZE)
    obj = parse_object("resources/x/analyzeResults/op-1")
    a = data_key_format.wrap(aead, 12, obj, key, b"ad")
    b = data_key_format.wrap(aead, 12, obj, key, b"ad")
    assert a != b
    assert len(a) == len(b) == data_key_format.WRAPPED_SIZE
    assert key not in a
    for wrapped in (a, b):
        parsed = data_key_format.parse(wrapped)
        assert parsed.version == 12
        assert data_key_format.unwrap(aead, parsed, obj, b"ad") == key
    with pytest.raises(DecryptionFailed):
        data_key_format.unwrap(aead, data_key_format.parse(a), obj, b"")
