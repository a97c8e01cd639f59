"""Which root protects a purpose's resource keys, and the customer-key providers behind them.

Every stored resource-key version starts as a service seal (broker.sealing: the resource key
sealed by the resource's service root, bound to resource, purpose and version). Under a
customer-managed key the stored bytes are that seal wrapped once more by the customer's key:

    stored = service_seal(resource_key)                     service-managed
    stored = customer_key.wrap(service_seal(resource_key))  customer-managed

so opening a customer-managed version needs both keys, and the inner seal binds it to its
resource, which RSA-OAEP and key wrap cannot. Moving between roots (enable, rotate, move, disable)
unwraps and re-wraps the outer layer only; the resource key itself never leaves memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import (
    FailedPrecondition,
    InvalidArgument,
    KeybrokerError,
    StoredKeyCorrupt,
    Unavailable,
)
from broker.providers import (
    KeyNotFound,
    KeyReference,
    KeyUnavailable,
    ProviderUnavailable,
    RootKeyProvider,
    UnsupportedKey,
    WrappedKeyInvalid,
)
from broker.providers.interface import ProviderError
from broker.providers.retrying import RetryingProvider
from broker.settings import Settings

log = logging.getLogger(__name__)

PROVIDERS = ("pkcs11", "azure-keyvault", "dev-vault")


class CustomerKeyUnavailable(FailedPrecondition):
    """The customer's key cannot be used now (the seed's 403 InvalidDataProtectionKey)."""

    def __init__(self, resource: str) -> None:
        super().__init__(
            "CUSTOMER_KEY_UNAVAILABLE",
            f"the customer-managed key of {resource} is unavailable "
            "(disabled, deleted, or access removed)",
        )


class ProviderRegistry:
    """The configured providers, built lazily on first use (no connection at start-up)."""

    def __init__(self, factories: dict[str, Callable[[], RootKeyProvider]]) -> None:
        self._factories = factories
        self._providers: dict[str, RootKeyProvider] = {}
        self._opened: list[RetryingProvider] = []

    def get(self, name: str) -> RootKeyProvider:
        provider = self._providers.get(name)
        if provider is not None:
            return provider
        if name not in PROVIDERS:
            raise InvalidArgument(
                "UNKNOWN_KEY_PROVIDER", f"key.provider must be one of {', '.join(PROVIDERS)}"
            )
        factory = self._factories.get(name)
        if factory is None:
            raise FailedPrecondition(
                "KEY_PROVIDER_NOT_CONFIGURED", f"the {name} provider is not configured here"
            )
        retrying = RetryingProvider(factory())
        self._providers[name] = retrying
        self._opened.append(retrying)
        return retrying

    async def aclose(self) -> None:
        """Closes every provider opened so far (their HTTP clients, sessions)."""
        for provider in self._opened:
            await provider.aclose()
        self._opened.clear()


def registry_from_settings(
    settings: Settings, extra: dict[str, Callable[[], RootKeyProvider]] | None = None
) -> ProviderRegistry:
    """Factories for the providers the settings enable (imports happen on first use)."""
    factories: dict[str, Callable[[], RootKeyProvider]] = {}
    if settings.dev_vault:
        data_dir = Path(settings.data_dir)

        def dev() -> RootKeyProvider:
            from broker.providers.dev_vault import dev_vault_provider

            return dev_vault_provider(data_dir)

        factories["dev-vault"] = dev
    if settings.pkcs11_module:

        def pkcs11() -> RootKeyProvider:
            from broker.providers.pkcs11 import pkcs11_provider

            return pkcs11_provider(
                settings.pkcs11_module,
                settings.pkcs11_pin,
                allow_oaep_sha1=settings.pkcs11_allow_oaep_sha1,
            )

        factories["pkcs11"] = pkcs11

    def azure() -> RootKeyProvider:
        from broker.providers.azure_keyvault import azure_keyvault_provider

        return azure_keyvault_provider(connection_verify=settings.azure_ca_bundle or True)

    factories["azure-keyvault"] = azure
    factories.update(extra or {})
    return ProviderRegistry(factories)


@dataclass(frozen=True)
class Root:
    """How one purpose's resource keys are stored now: under the service seal alone, or with
    the customer's key around it (see the module docstring)."""

    key_id: str
    resource: str
    customer_key: KeyReference | None = None
    provider: RootKeyProvider | None = field(default=None, repr=False)

    async def protect(self, sealed: bytes) -> bytes:
        """The stored form of a service seal under this root."""
        if self.customer_key is None:
            return sealed
        assert self.provider is not None
        try:
            return await self.provider.wrap(self.customer_key, sealed)
        except ProviderError as exc:
            raise self._translate(exc) from None

    async def unprotect(self, stored: bytes) -> bytes:
        """The service seal inside a stored version."""
        if self.customer_key is None:
            return stored
        assert self.provider is not None
        try:
            return await self.provider.unwrap(self.customer_key, stored)
        except ProviderError as exc:
            raise self._translate(exc) from None

    def _translate(self, exc: ProviderError) -> KeybrokerError:
        error = self._refusal(exc)
        if self.customer_key is not None:
            error.key_ids = (self.customer_key.key_id,)  # the provider outcome is audited
        return error

    def _refusal(self, exc: ProviderError) -> KeybrokerError:
        key_id = self.customer_key.key_id if self.customer_key else "?"
        if isinstance(exc, KeyUnavailable):
            log.warning("customer key %s of %s unavailable: %s", key_id, self.resource, exc)
            return CustomerKeyUnavailable(self.resource)
        if isinstance(exc, ProviderUnavailable):
            log.warning("key vault for %s unreachable: %s", key_id, exc)
            return Unavailable(
                "CUSTOMER_KEY_VAULT_UNAVAILABLE",
                f"the key vault of {self.resource}'s customer-managed key did not answer",
            )
        if isinstance(exc, WrappedKeyInvalid):
            log.error("stored key of %s does not open under %s", self.resource, key_id)
            return StoredKeyCorrupt()
        if isinstance(exc, UnsupportedKey):
            return FailedPrecondition("UNSUPPORTED_CUSTOMER_KEY", str(exc)[:200])
        return Unavailable("CUSTOMER_KEY_VAULT_UNAVAILABLE", "the key vault failed")


def describe_error(exc: ProviderError, reference: KeyReference) -> KeybrokerError:
    """A precise refusal for a key that fails the checks at enable/update time."""
    if isinstance(exc, KeyNotFound):
        return FailedPrecondition(
            "CUSTOMER_KEY_NOT_FOUND", f"{reference.key_id} was not found (or is not visible)"
        )
    if isinstance(exc, KeyUnavailable):
        return FailedPrecondition(
            "CUSTOMER_KEY_UNAVAILABLE", f"{reference.key_id} may not be used: {str(exc)[:200]}"
        )
    if isinstance(exc, UnsupportedKey):
        return FailedPrecondition("UNSUPPORTED_CUSTOMER_KEY", str(exc)[:200])
    return Unavailable("CUSTOMER_KEY_VAULT_UNAVAILABLE", "the key vault did not answer")
