"""Azure Key Vault and Managed HSM root keys, through azure-keyvault-keys and azure-identity.

Every wrap and unwrap is performed by the vault. The SDK's CryptographyClient would wrap locally
with an RSA key's public half once it has fetched it, which skips the vault's own checks
(enabled, nbf/exp, access): the client used here never fetches key material, and `wrap` checks
the key's state itself first, so a wrap never succeeds on a key the vault reports disabled or
outside its validity window. Unwrap is not checked here (Azure unwraps outside nbf/exp too): the
vault refuses what it refuses.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
from azure.identity.aio import DefaultAzureCredential, ManagedIdentityCredential
from azure.keyvault.keys import KeyVaultKey
from azure.keyvault.keys.aio import KeyClient
from azure.keyvault.keys.crypto import KeyWrapAlgorithm
from azure.keyvault.keys.crypto.aio import CryptographyClient

from broker.providers.interface import (
    KeyDescription,
    KeyNotFound,
    KeyReference,
    KeyUnavailable,
    ProviderError,
    ProviderUnavailable,
    RootKeyProvider,
    UnsupportedKey,
    WrappedKeyInvalid,
)

T = TypeVar("T")

PROVIDER_NAME = "azure-keyvault"
MAX_PLAINTEXT_BYTES = 128
"""The interface's limit on what `wrap` takes."""
STATE_CHECK_SECONDS = 30.0
"""How long a key's enabled/nbf/exp state, read before a wrap, is trusted for further wraps."""
CONNECTION_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 30.0

FORMAT_VERSION = 1
ALG_RSA_OAEP_256 = 1
ALG_A256KW = 2
_ALGORITHMS = {
    ALG_RSA_OAEP_256: KeyWrapAlgorithm.rsa_oaep_256,
    ALG_A256KW: KeyWrapAlgorithm.aes_256,
}
_MAX_VAULT_RESULT = 512
"""The longest wrapKey result: RSA-4096 (an A256KW result is at most 144 bytes)."""
_RSA_SIZES = frozenset({2048, 3072, 4096})
_UNWRAP_FAILED = "the wrapped key does not open under this key"

# Soft delete and purge protection both on: every level without "Purgeable".
_RECOVERABLE_LEVELS = frozenset(
    {
        "Recoverable",
        "Recoverable+ProtectedSubscription",
        "CustomizedRecoverable",
        "CustomizedRecoverable+ProtectedSubscription",
    }
)
_KEY_TYPES = {"RSA": "RSA", "RSA-HSM": "RSA", "oct": "AES", "oct-HSM": "AES"}
_SAFE_CODE = re.compile(r"[^A-Za-z0-9_.+-]")


def azure_keyvault_provider(
    *,
    credential_for: Callable[[str], AsyncTokenCredential] | None = None,
    connection_verify: str | bool = True,
) -> RootKeyProvider:
    """Keys in Azure Key Vault or Managed HSM (KeyReference.vault is the vault or HSM URL).

    `credential_for(identity)` gives the credential to act as for KeyReference.identity; by
    default a user-assigned ManagedIdentityCredential for a client id, DefaultAzureCredential
    for "". The provider owns (and closes in `aclose`) what it returns. `connection_verify`:
    True, or the path of a CA bundle. Nothing connects before the first call.
    """
    return _AzureKeyVault(credential_for or _default_credential, connection_verify)


def _default_credential(identity: str) -> AsyncTokenCredential:
    if identity:
        return ManagedIdentityCredential(client_id=identity)
    return DefaultAzureCredential()


class _VaultOnlyCryptographyClient(CryptographyClient):
    """A CryptographyClient that never fetches the key, so it has no local key material and
    every operation goes to the vault (the SDK otherwise wraps locally with an RSA public key,
    without the vault's enabled/nbf/exp/access checks)."""

    async def _initialize(self, **kwargs: Any) -> None:
        return None


@dataclass(frozen=True, slots=True)
class _KeyState:
    version: str
    kty: str
    size: int
    enabled: bool
    not_before: datetime | None
    expires_on: datetime | None
    recovery_level: str | None
    operations: frozenset[str]

    @classmethod
    def of(cls, key: KeyVaultKey) -> _KeyState:
        jwk = key.key
        kty = _text(key.key_type)
        size = 0
        if kty in ("RSA", "RSA-HSM") and jwk.n:  # type: ignore[attr-defined]
            size = int.from_bytes(jwk.n, "big").bit_length()  # type: ignore[attr-defined]
        elif kty in ("oct", "oct-HSM") and jwk.k:  # type: ignore[attr-defined]
            size = len(jwk.k) * 8  # type: ignore[attr-defined]
        props = key.properties
        return cls(
            version=props.version or "",
            kty=kty,
            size=size,
            enabled=props.enabled is True,
            not_before=props.not_before,
            expires_on=props.expires_on,
            recovery_level=props.recovery_level,
            operations=frozenset(_text(op) for op in key.key_operations or ()),
        )

    def usable_at(self, now: datetime) -> bool:
        return (
            self.enabled
            and (self.not_before is None or self.not_before <= now)
            and (self.expires_on is None or now < self.expires_on)
        )


class _AzureKeyVault:
    """Wraps and unwraps in Azure Key Vault (RSA, RSA-HSM keys) or Managed HSM (oct-HSM keys).

    Wrapped format, version 1 (what `wrap` returns; opaque to the broker):

        byte 0      0x01, the format version
        byte 1      the algorithm: 0x01 RSA-OAEP-256 of the plaintext (RSA and RSA-HSM keys),
                    0x02 A256KW (RFC 3394) of the padded plaintext (oct and oct-HSM keys)
        bytes 2..   the vault's wrapKey result, unchanged (RSA: the modulus length;
                    A256KW: the padded length + 8)

    A256KW takes a multiple of 8 bytes, at least 16, so what the vault wraps is
    len(plaintext) (1 byte) || plaintext || zero bytes up to max(16, a multiple of 8). The key
    version is not repeated: the broker records the KeyReference beside the wrapped bytes.

    Errors: 401/403 (KeyDisabled, KeyOperationForbidden, Forbidden, ...) -> KeyUnavailable;
    404 -> KeyNotFound; 429, 5xx, no answer, no token -> ProviderUnavailable; 400 on unwrap ->
    WrappedKeyInvalid (one fixed message), elsewhere -> UnsupportedKey. The SDK retries nothing
    (retry_total=0): the caller owns the backoff, and a throttled vault asks for one.
    """

    name = PROVIDER_NAME

    def __init__(
        self, credential_for: Callable[[str], AsyncTokenCredential], connection_verify: str | bool
    ) -> None:
        self._credential_for = credential_for
        self._client_options: dict[str, Any] = {
            "connection_verify": connection_verify,
            "retry_total": 0,
            "connection_timeout": CONNECTION_TIMEOUT_SECONDS,
            "read_timeout": READ_TIMEOUT_SECONDS,
        }
        self._credentials: dict[str, AsyncTokenCredential] = {}
        self._key_clients: dict[tuple[str, str], KeyClient] = {}
        self._crypto_clients: dict[tuple[str, str, str, str], CryptographyClient] = {}
        self._checked: dict[KeyReference, tuple[float, _KeyState]] = {}
        self._closed = False

    async def wrap(self, key: KeyReference, plaintext: bytes) -> bytes:
        _check_reference(key, versioned=True)
        if len(plaintext) > MAX_PLAINTEXT_BYTES:
            raise ValueError(f"wrap takes at most {MAX_PLAINTEXT_BYTES} bytes")
        state = await self._usable_state(key)
        if state.kty in ("RSA", "RSA-HSM"):
            algorithm, payload = ALG_RSA_OAEP_256, plaintext
        else:
            algorithm, payload = ALG_A256KW, _pad(plaintext)
        client = self._crypto_client(key)
        try:
            result = await _vault(key, "wrap", client.wrap_key(_ALGORITHMS[algorithm], payload))
        except KeyUnavailable:
            self._checked.pop(key, None)  # read the state again before the next wrap
            raise
        return bytes((FORMAT_VERSION, algorithm)) + result.encrypted_key

    async def unwrap(self, key: KeyReference, wrapped: bytes) -> bytes:
        _check_reference(key, versioned=True)
        if (
            len(wrapped) < 3
            or len(wrapped) > 2 + _MAX_VAULT_RESULT
            or wrapped[0] != FORMAT_VERSION
            or wrapped[1] not in _ALGORITHMS
        ):
            raise WrappedKeyInvalid(_UNWRAP_FAILED)
        algorithm = wrapped[1]
        client = self._crypto_client(key)
        result = await _vault(key, "unwrap", client.unwrap_key(_ALGORITHMS[algorithm], wrapped[2:]))
        if algorithm == ALG_A256KW:
            return _unpad(result.key)
        return result.key

    async def describe(self, key: KeyReference) -> KeyDescription:
        _check_reference(key, versioned=False)
        state = await self._read_state(key)
        key_type = _KEY_TYPES.get(state.kty)
        if key_type is None:
            raise UnsupportedKey(f"{key.key_id} is a {_safe(state.kty)} key: use RSA or AES")
        return KeyDescription(
            reference=key.at(state.version),
            key_type=key_type,
            key_size=state.size,
            enabled=state.usable_at(datetime.now(UTC)),
            recoverable=None
            if state.recovery_level is None
            else state.recovery_level in _RECOVERABLE_LEVELS,
        )

    async def aclose(self) -> None:
        """Closes every client and credential this provider opened."""
        self._closed = True
        crypto, keys, credentials = self._crypto_clients, self._key_clients, self._credentials
        self._crypto_clients, self._key_clients, self._credentials = {}, {}, {}
        self._checked.clear()
        for crypto_client in crypto.values():
            await crypto_client.close()
        for key_client in keys.values():
            await key_client.close()
        for credential in credentials.values():
            await credential.close()

    async def _usable_state(self, key: KeyReference) -> _KeyState:
        """The key's state, read at most every STATE_CHECK_SECONDS, if it may wrap now."""
        checked = self._checked.get(key)
        if checked is not None and time.monotonic() - checked[0] < STATE_CHECK_SECONDS:
            state = checked[1]
        else:
            state = await self._read_state(key)
            self._checked[key] = (time.monotonic(), state)
        if state.kty in ("RSA", "RSA-HSM"):
            if state.size not in _RSA_SIZES:
                raise UnsupportedKey(f"{key.key_id} is RSA-{state.size}: use 2048, 3072 or 4096")
        elif state.kty in ("oct", "oct-HSM"):
            if state.size not in (0, 256):  # 0: Managed HSM does not reveal an oct-HSM size
                raise UnsupportedKey(f"{key.key_id} is AES-{state.size}: use AES-256")
        else:
            raise UnsupportedKey(f"{key.key_id} is a {_safe(state.kty)} key: use RSA or AES")
        if state.operations and not {"wrapKey", "unwrapKey"} <= state.operations:
            raise UnsupportedKey(f"{key.key_id} does not permit both wrapKey and unwrapKey")
        if not state.enabled:
            raise KeyUnavailable(f"{key.key_id} is disabled")
        now = datetime.now(UTC)
        if state.not_before is not None and now < state.not_before:
            raise KeyUnavailable(
                f"{key.key_id} is not valid before {state.not_before:%Y-%m-%dT%H:%M:%SZ}"
            )
        if state.expires_on is not None and now >= state.expires_on:
            raise KeyUnavailable(f"{key.key_id} expired at {state.expires_on:%Y-%m-%dT%H:%M:%SZ}")
        return state

    async def _read_state(self, key: KeyReference) -> _KeyState:
        client = self._key_client(key)
        return _KeyState.of(
            await _vault(key, "get", client.get_key(key.key_name, key.version or None))
        )

    def _credential(self, identity: str) -> AsyncTokenCredential:
        credential = self._credentials.get(identity)
        if credential is None:
            credential = self._credentials[identity] = self._credential_for(identity)
        return credential

    def _key_client(self, key: KeyReference) -> KeyClient:
        self._check_open()
        slot = (key.vault, key.identity)
        client = self._key_clients.get(slot)
        if client is None:
            client = self._key_clients[slot] = KeyClient(
                _vault_url(key), self._credential(key.identity), **self._client_options
            )
        return client

    def _crypto_client(self, key: KeyReference) -> CryptographyClient:
        self._check_open()
        slot = (key.vault, key.key_name, key.version, key.identity)
        client = self._crypto_clients.get(slot)
        if client is None:
            key_id = f"{_vault_url(key)}/keys/{key.key_name}/{key.version}"
            client = self._crypto_clients[slot] = _VaultOnlyCryptographyClient(
                key_id, self._credential(key.identity), **self._client_options
            )
        return client

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the azure-keyvault provider is closed")


async def _vault(key: KeyReference, operation: str, call: Awaitable[T]) -> T:
    """Awaits one SDK call, translating the SDK's errors at this boundary (and only here)."""
    try:
        return await call
    except HttpResponseError as exc:
        raise _translate(exc, key, operation) from None
    except (ServiceRequestError, ServiceResponseError) as exc:
        raise ProviderUnavailable(
            f"Azure Key Vault did not answer {operation} of {key.key_id} ({type(exc).__name__})"
        ) from None


def _translate(exc: HttpResponseError, key: KeyReference, operation: str) -> ProviderError:
    status = exc.status_code
    if status is None:  # no answer at all: the credential could not get a token
        return ProviderUnavailable(
            f"no Azure token for {operation} of {key.key_id} ({type(exc).__name__})"
        )
    what = f"{operation} of {key.key_id}: HTTP {status} {_error_code(exc)}".rstrip()
    if status in (401, 403):
        return KeyUnavailable(f"Azure Key Vault refused {what}")
    if status == 404:
        return KeyNotFound(f"Azure Key Vault does not know {what}")
    if status == 400 and operation == "unwrap":
        return WrappedKeyInvalid(_UNWRAP_FAILED)
    if status == 400:
        return UnsupportedKey(f"Azure Key Vault rejected {what}")
    return ProviderUnavailable(f"Azure Key Vault could not serve {what}")


def _error_code(exc: HttpResponseError) -> str:
    """The service's error code and inner code ("Forbidden/KeyDisabled"), never its message."""
    error = exc.error
    if error is None:
        return ""
    codes = [error.code or ""]
    inner = getattr(error, "innererror", None)
    if isinstance(inner, dict) and isinstance(inner.get("code"), str):
        codes.append(inner["code"])
    return "/".join(_safe(code) for code in codes if code)


def _text(value: object) -> str:
    """An SDK enum member's wire value (str() of a str-Enum is "Class.member" before 3.11's
    StrEnum), or the string the service sent when the SDK has no member for it."""
    return str(getattr(value, "value", value))


def _safe(text: str) -> str:
    return _SAFE_CODE.sub("", text)[:64]


def _check_reference(key: KeyReference, *, versioned: bool) -> None:
    if key.provider != PROVIDER_NAME:
        raise ValueError(f"not an {PROVIDER_NAME} key: {key.provider}")
    if versioned and not key.version:
        raise ValueError("wrap and unwrap need a key version")
    for part in (key.key_name, key.version):
        if "/" in part or "?" in part or "#" in part:
            raise ValueError("key names and versions are single path segments")


def _vault_url(key: KeyReference) -> str:
    url = key.vault.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.netloc or parts.path or parts.query:
        raise ValueError("an Azure vault is an https:// URL with no path")
    return url


def _pad(plaintext: bytes) -> bytes:
    padded = max(16, -(-(1 + len(plaintext)) // 8) * 8)
    return bytes((len(plaintext),)) + plaintext + bytes(padded - 1 - len(plaintext))


def _unpad(padded: bytes) -> bytes:
    if not padded:
        raise WrappedKeyInvalid(_UNWRAP_FAILED)
    length = padded[0]
    if len(padded) != max(16, -(-(1 + length) // 8) * 8) or any(padded[1 + length :]):
        raise WrappedKeyInvalid(_UNWRAP_FAILED)
    return padded[1 : 1 + length]
