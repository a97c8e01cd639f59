"""The root-key provider contract (see broker.providers)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol


@dataclass(frozen=True, slots=True)
class KeyReference:
    """Names a customer key: which provider, which vault or token, which key, which version.

    `vault`: pkcs11 -> the token label; azure-keyvault -> the vault or managed HSM URL
    (https://NAME.vault.azure.net); dev-vault -> "dev". `version`: "" means "the latest" (only
    `describe` accepts that; wrap and unwrap always name a version). `identity`: optional, the
    identity to act as (azure-keyvault: a user-assigned managed identity's client id).
    """

    provider: str
    vault: str
    key_name: str
    version: str = ""
    identity: str = ""

    @property
    def key_id(self) -> str:
        """The versioned key id recorded beside everything this key wraps and in the audit."""
        return f"{self.provider}:{self.vault}/{self.key_name}/{self.version}"

    def at(self, version: str) -> KeyReference:
        return replace(self, version=version)


@dataclass(frozen=True, slots=True)
class KeyDescription:
    """What a provider can tell about a key version before the broker relies on it."""

    reference: KeyReference
    """With the concrete version (the latest one when asked with version "")."""
    key_type: str
    """"RSA" or "AES"."""
    key_size: int
    """In bits."""
    enabled: bool
    recoverable: bool | None
    """Soft delete and purge protection both on; None when the provider cannot tell."""


class ProviderError(Exception):
    """Base of what providers raise. Messages are safe to log; they never hold key material."""


class KeyUnavailable(ProviderError):
    """The key exists but may not be used now: disabled, deleted, outside its validity window,
    or this identity lost access. The customer's doing; retrying soon will not help."""


class KeyNotFound(KeyUnavailable):
    """No such vault, key or version (or none this identity can see)."""


class UnsupportedKey(ProviderError):
    """The key's type, size or permitted operations do not fit a root key."""


class WrappedKeyInvalid(ProviderError):
    """What was given to unwrap does not authenticate under this key (stored data damaged)."""


class ProviderUnavailable(ProviderError):
    """The vault or HSM could not answer (unreachable, throttled, busy): retry with backoff."""


class RootKeyProvider(Protocol):
    """A customer's key store. Implementations are safe to call concurrently."""

    name: str
    """The provider name used in KeyReference.provider ("pkcs11", "azure-keyvault", ...)."""

    async def wrap(self, key: KeyReference, plaintext: bytes) -> bytes:
        """Encrypts `plaintext` (at most 128 bytes) under the versioned key, inside the vault or
        HSM, or locally with its public key only after checking the key is enabled and valid.
        The result is the provider's own versioned format, opaque to the broker."""
        ...

    async def unwrap(self, key: KeyReference, wrapped: bytes) -> bytes:
        """Decrypts what `wrap` returned, inside the vault or HSM. Raises KeyUnavailable when the
        customer revoked the key, ProviderUnavailable when it cannot answer, and
        WrappedKeyInvalid when `wrapped` does not authenticate (never saying why)."""
        ...

    async def describe(self, key: KeyReference) -> KeyDescription:
        """Type, size, state and recoverability of the key version (the latest if version "")."""
        ...
