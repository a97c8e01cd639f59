"""The configured root-key providers, by name, built lazily on first use (no connection at
start-up) and wrapped in bounded retries (broker.providers.retrying)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from broker.core.errors import FailedPrecondition, InvalidArgument
from broker.core.settings import Settings
from broker.providers.interface import RootKeyProvider
from broker.providers.retrying import RetryingProvider

PROVIDERS = ("pkcs11", "azure-keyvault", "dev-vault")


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
