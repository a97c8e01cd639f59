"""Data-key operations: generate, decrypt and re-wrap one data key of one object.

The hot path. On a warm cache each call is a name match, two dict look-ups and one AES-GCM-SIV
operation: no SQL, no root-key call. Audit is the caller's business (broker.service).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from broker.core.errors import InvalidArgument
from broker.core.limits import MAX_ASSOCIATED_DATA_LENGTH
from broker.core.names import ObjectName
from broker.keys import data_key_format
from broker.keys.key_store import KeyStore, UsableKey


@dataclass(frozen=True, slots=True)
class GeneratedKey:
    plaintext: bytes
    wrapped: bytes
    key_id: str


@dataclass(frozen=True, slots=True)
class RewrappedKey:
    wrapped: bytes
    key_id: str
    rewrapped: bool


def _check_ad(ad: bytes) -> bytes:
    if len(ad) > MAX_ASSOCIATED_DATA_LENGTH:
        raise InvalidArgument(
            "FIELD_TOO_LONG", f"associated_data is longer than {MAX_ASSOCIATED_DATA_LENGTH} bytes"
        )
    return ad


def _usable(key: UsableKey) -> UsableKey:
    if key.refusal is not None:
        raise key.refusal
    return key


class DataKeys:
    """Data-key operations over a KeyStore."""

    def __init__(self, keys: KeyStore) -> None:
        self._keys = keys

    async def _current(self, obj: ObjectName) -> UsableKey:
        return _usable(await self._keys.current(obj.resource_id, obj.purpose))

    async def generate(self, obj: ObjectName, ad: bytes) -> GeneratedKey:
        _check_ad(ad)
        key = await self._current(obj)
        assert key.aead is not None
        plaintext = os.urandom(data_key_format.DATA_KEY_SIZE)
        return GeneratedKey(
            plaintext, data_key_format.wrap(key.aead, key.version, obj, plaintext, ad), key.key_id
        )

    async def decrypt(self, obj: ObjectName, wrapped: bytes, ad: bytes) -> tuple[bytes, str]:
        """(plaintext data key, id of the version that wrapped it)."""
        _check_ad(ad)
        parsed = data_key_format.parse(wrapped)
        key = _usable(await self._keys.version(obj.resource_id, obj.purpose, parsed.version))
        assert key.aead is not None
        return data_key_format.unwrap(key.aead, parsed, obj, ad), key.key_id

    async def rewrap(self, obj: ObjectName, wrapped: bytes, ad: bytes) -> RewrappedKey:
        """Moves a wrapped key to the current version; returns it unchanged when already there.

        The input is authenticated even when it is current, so a damaged key is never reported
        as fine.
        """
        _check_ad(ad)
        parsed = data_key_format.parse(wrapped)
        current = await self._current(obj)
        old = (
            current
            if parsed.version == current.version
            else _usable(await self._keys.version(obj.resource_id, obj.purpose, parsed.version))
        )
        assert old.aead is not None
        assert current.aead is not None
        plaintext = data_key_format.unwrap(old.aead, parsed, obj, ad)
        if old is current:
            return RewrappedKey(wrapped, current.key_id, False)
        rewrapped = data_key_format.wrap(current.aead, current.version, obj, plaintext, ad)
        return RewrappedKey(rewrapped, current.key_id, True)
