"""Which root protects a purpose's resource keys, and the customer-key providers behind them.

Every stored resource-key version starts as a service wrap (broker.keys.key_wrapping: the resource
key wrapped by the resource's service root, bound to resource, purpose and version). Under a
customer-managed key the stored bytes are that seal wrapped once more by the customer's key:

    stored = service_seal(resource_key)                     service-managed
    stored = customer_key.wrap(service_seal(resource_key))  customer-managed

so opening a customer-managed version needs both keys, and the inner seal binds it to its
resource, which RSA-OAEP and key wrap cannot. Moving between roots (enable, rotate, move, disable)
unwraps and re-wraps the outer layer only; the resource key itself never leaves memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from broker.core.errors import FailedPrecondition, KeybrokerError, StoredKeyCorrupt, Unavailable
from broker.providers import (
    KeyNotFound,
    KeyReference,
    KeyUnavailable,
    ProviderError,
    ProviderUnavailable,
    RootKeyProvider,
    UnsupportedKey,
    WrappedKeyInvalid,
)

log = logging.getLogger(__name__)


class CustomerKeyUnavailable(FailedPrecondition):
    """The customer's key cannot be used now (the seed's 403 InvalidDataProtectionKey)."""

    def __init__(self, resource: str) -> None:
        super().__init__(
            "CUSTOMER_KEY_UNAVAILABLE",
            f"the customer-managed key of {resource} is unavailable "
            "(disabled, deleted, or access removed)",
        )


@dataclass(frozen=True)
class Root:
    """How one purpose's resource keys are stored now: under the service seal alone, or with
    the customer's key around it (see the module docstring)."""

    key_id: str
    resource: str
    customer_key: KeyReference | None = None
    provider: RootKeyProvider | None = field(default=None, repr=False)

    async def wrap(self, sealed: bytes) -> bytes:
        """The stored form of a service seal under this root."""
        if self.customer_key is None:
            return sealed
        assert self.provider is not None
        try:
            return await self.provider.wrap(self.customer_key, sealed)
        except ProviderError as exc:
            raise self._translate(exc) from None

    async def unwrap(self, stored: bytes) -> bytes:
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
