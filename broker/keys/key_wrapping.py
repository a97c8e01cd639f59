"""Key wrapping: a key encrypted under a key-encryption key with AES-256-GCM (`wrap` / `unwrap`).

Used for a service-managed root key under the master key, and for a resource key under its
service-managed root key (the "service wrap"; a customer-managed key wraps that once more,
broker.keys.roots). Format, version 1 (61 bytes for a 32-byte key):

    0x01 || nonce (12 random bytes) || AES-256-GCM(kek, nonce, key, aad) (len(key) + 16 bytes)
    aad = associated_data.encode(b"keybroker/sealed-key/v1", label, *context)

`label` says what kind of key is wrapped (b"root-key", b"resource-key") and `context` binds it to
where it belongs (resource name, purpose, version), so a wrapped key copied to another row fails
to open. A random 96-bit nonce is safe here: a key-encryption key wraps at most millions of keys.
The domain string keeps its original name ("sealed-key"): it is part of the format.
"""

from __future__ import annotations

import os
from typing import Protocol

from cryptography.exceptions import InvalidTag

from broker.keys import associated_data

FORMAT_V1 = 0x01
NONCE_SIZE = 12
TAG_SIZE = 16
_DOMAIN = b"keybroker/sealed-key/v1"


class Aead(Protocol):
    """A key-encryption key with AESGCM's shape: cryptography's AESGCM, or the master key in a
    PKCS#11 token (broker.keys.master_key_pkcs11). `decrypt` raises cryptography's InvalidTag when
    the ciphertext does not authenticate; any other exception passes through unwrap."""

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes: ...


class UnwrapError(Exception):
    """A wrapped key did not authenticate (wrong key, wrong context, or damaged). No details."""


def _aad(label: bytes, context: tuple[bytes, ...]) -> bytes:
    return associated_data.encode(_DOMAIN, label, *context)


def wrap(kek: Aead, key: bytes, label: bytes, context: tuple[bytes, ...]) -> bytes:
    """Wraps `key` under `kek`, bound to `label` and `context`."""
    nonce = os.urandom(NONCE_SIZE)
    return bytes([FORMAT_V1]) + nonce + kek.encrypt(nonce, key, _aad(label, context))


def unwrap(kek: Aead, wrapped: bytes, label: bytes, context: tuple[bytes, ...]) -> bytes:
    """Opens a wrapped key; raises UnwrapError on any mismatch."""
    if len(wrapped) < 1 + NONCE_SIZE + TAG_SIZE or wrapped[0] != FORMAT_V1:
        raise UnwrapError
    nonce = wrapped[1 : 1 + NONCE_SIZE]
    try:
        return kek.decrypt(nonce, wrapped[1 + NONCE_SIZE :], _aad(label, context))
    except InvalidTag:
        raise UnwrapError from None
