"""Wrapped data keys: the bytes a caller stores beside its object.

Format, version 1 (65 bytes):

    0x01 || version (uint32 big-endian) || nonce (12 random bytes)
         || AES-256-GCM-SIV(resource key, nonce, data key (32 bytes), aad) (48 bytes)
    aad = associated_data.encode(b"keybroker/data-key/v1", object name, purpose,
                                 version (uint32 big-endian), caller associated_data)

`version` names the resource-key version of (resource, purpose) that wrapped it; resource and
purpose follow from the object name the caller gives, which is bound through the aad, so a wrapped
key presented under any other name, purpose, version or caller context fails to open. AES-GCM-SIV
(RFC 8452) keeps confidentiality and authenticity if a random nonce ever repeats.

Parsing is split from opening: `parse` rejects what is structurally not a version-1 key (precise
errors are safe there), while every failure after that is one `DecryptionFailed`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from broker.core.errors import DecryptionFailed, InvalidArgument
from broker.core.limits import MAX_WRAPPED_KEY_LENGTH
from broker.core.names import ObjectName
from broker.keys import associated_data

FORMAT_V1 = 0x01
DATA_KEY_SIZE = 32
NONCE_SIZE = 12
_HEADER = struct.Struct(">BI")
WRAPPED_SIZE = _HEADER.size + NONCE_SIZE + DATA_KEY_SIZE + 16
_DOMAIN = b"keybroker/data-key/v1"
_VERSION = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class WrappedDataKey:
    """A parsed version-1 wrapped data key (not yet authenticated)."""

    version: int
    raw: bytes


def _aad(obj: ObjectName, version: int, caller_ad: bytes) -> bytes:
    return associated_data.encode(
        _DOMAIN,
        obj.name.encode(),
        obj.purpose.value.encode(),
        _VERSION.pack(version),
        caller_ad,
    )


def wrap(
    aead: AESGCMSIV, version: int, obj: ObjectName, data_key: bytes, caller_ad: bytes
) -> bytes:
    """Wraps `data_key` for object `obj` under resource-key `version` (held in `aead`)."""
    nonce = os.urandom(NONCE_SIZE)
    header = _HEADER.pack(FORMAT_V1, version)
    return header + nonce + aead.encrypt(nonce, data_key, _aad(obj, version, caller_ad))


def parse(wrapped: bytes) -> WrappedDataKey:
    """Reads the header. Oversized or unknown-format input gets a precise error; anything else
    that is not exactly a version-1 key is an authentication failure (no hint at what is wrong)."""
    if not wrapped:
        raise InvalidArgument("MISSING_FIELD", "wrapped_data_key is required")
    if len(wrapped) > MAX_WRAPPED_KEY_LENGTH:
        raise InvalidArgument(
            "FIELD_TOO_LONG", f"wrapped_data_key is longer than {MAX_WRAPPED_KEY_LENGTH} bytes"
        )
    if wrapped[0] != FORMAT_V1:
        raise InvalidArgument(
            "UNSUPPORTED_FORMAT_VERSION", "wrapped_data_key has an unknown format version"
        )
    if len(wrapped) != WRAPPED_SIZE:
        raise DecryptionFailed
    _, version = _HEADER.unpack_from(wrapped)
    if version == 0:
        raise DecryptionFailed
    return WrappedDataKey(version, wrapped)


def unwrap(aead: AESGCMSIV, key: WrappedDataKey, obj: ObjectName, caller_ad: bytes) -> bytes:
    """Opens a parsed wrapped key; raises DecryptionFailed on any mismatch."""
    start = _HEADER.size
    nonce = key.raw[start : start + NONCE_SIZE]
    try:
        return aead.decrypt(nonce, key.raw[start + NONCE_SIZE :], _aad(obj, key.version, caller_ad))
    except InvalidTag:
        raise DecryptionFailed from None
