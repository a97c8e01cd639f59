"""Root-key providers: the customer's key store, which the broker may only ask to wrap and unwrap.

One module per provider, each with a public factory and a private class behind the small
`RootKeyProvider` protocol (wrap, unwrap, describe); nothing else crosses this boundary. A
provider catches its SDK's own exceptions and raises only the errors below.
"""

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
from broker.providers.registry import PROVIDERS, ProviderRegistry, registry_from_settings

__all__ = [
    "PROVIDERS",
    "KeyDescription",
    "KeyNotFound",
    "KeyReference",
    "KeyUnavailable",
    "ProviderError",
    "ProviderRegistry",
    "ProviderUnavailable",
    "RootKeyProvider",
    "UnsupportedKey",
    "WrappedKeyInvalid",
    "registry_from_settings",
]
