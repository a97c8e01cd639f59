"""Loading the key hierarchy for use: master -> service root -> resource-key version.

`KeyStore` answers "which AEAD wraps data keys for (resource, purpose) now" and "which one opens
version v", from its in-memory cache (broker.keys.key_cache) or, on a miss, from SQL by
unwrapping the chain. What it returns for a version that must not be used (resource being deleted,
version scheduled for destruction) carries the refusal, so refusals are cached like keys.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESGCMSIV
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.core.errors import FailedPrecondition, KeybrokerError, NotFound, StoredKeyCorrupt
from broker.core.names import Purpose, key_version_name, resource_name
from broker.db.tables import CustomerKeyRow, KeyRingRow, KeyVersionRow, ResourceRow
from broker.keys import key_wrapping
from broker.keys.customer_key_checks import CustomerKeyChecks
from broker.keys.key_cache import KeyCache
from broker.keys.master_key import MasterKey
from broker.keys.roots import CustomerKeyUnavailable, Root
from broker.providers import KeyReference
from broker.providers.registry import ProviderRegistry

log = logging.getLogger(__name__)

ROOT_KEY_LABEL = b"root-key"
RESOURCE_KEY_LABEL = b"resource-key"
MAX_STORED_VERSION = 2**31 - 1
"""Highest version an SQL INTEGER column holds; a wrapped key may name any uint32."""


@dataclass(frozen=True, slots=True)
class UsableKey:
    """One resource-key version, ready to wrap/unwrap data keys unless `refusal` is set."""

    version: int
    key_id: str
    aead: AESGCMSIV | None
    refusal: KeybrokerError | None


def service_root_key_id(resource_id: str) -> str:
    """The versioned id of a resource's service-managed root key."""
    return f"{resource_name(resource_id)}/serviceRootKey/versions/1"


def root_context(resource_id: str) -> tuple[bytes, ...]:
    return (resource_name(resource_id).encode(),)


def resource_key_context(resource_id: str, purpose: Purpose, version: int) -> tuple[bytes, ...]:
    return (resource_name(resource_id).encode(), purpose.value.encode(), str(version).encode())


def resource_not_found(resource_id: str) -> NotFound:
    return NotFound("RESOURCE_NOT_FOUND", f"{resource_name(resource_id)} does not exist")


def resource_refusal(row: ResourceRow) -> KeybrokerError | None:
    """Why data keys of this resource cannot be used now, if they cannot."""
    if row.state == "delete_scheduled":
        return FailedPrecondition(
            "RESOURCE_DELETE_SCHEDULED", f"{resource_name(row.id)} is scheduled for deletion"
        )
    if row.state == "destroyed":
        return FailedPrecondition("RESOURCE_DESTROYED", f"{resource_name(row.id)} is destroyed")
    return None


def version_refusal(row: KeyVersionRow, name: str) -> KeybrokerError | None:
    if row.state == "destroy_scheduled":
        return FailedPrecondition(
            "KEY_VERSION_DESTROY_SCHEDULED", f"{name} is scheduled for destruction"
        )
    if row.state == "destroyed":
        return FailedPrecondition("KEY_VERSION_DESTROYED", f"{name} is destroyed")
    return None


class KeyStore:
    """Cached access to usable resource keys; see the module docstring."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        master_keys: Mapping[str, MasterKey],
        cache: KeyCache[tuple[str, str, int], UsableKey],
        providers: ProviderRegistry,
        checks: CustomerKeyChecks,
    ) -> None:
        self._sessions = sessions
        self.checks = checks
        self._master_keys = master_keys
        self.cache = cache
        self.providers = providers
        # Root-key unwraps attempted and failed (GetStatus reports them; a customer-managed
        # root makes each one a provider call).
        self.root_key_calls = 0
        self.root_key_failures = 0

    async def current(self, resource_id: str, purpose: Purpose) -> UsableKey:
        """The version that wraps new data keys (version 0 in the cache key means "current")."""
        return await self.cache.get(
            (resource_id, purpose.value, 0), lambda: self._load_current(resource_id, purpose)
        )

    async def _load_current(self, resource_id: str, purpose: Purpose) -> UsableKey:
        # Looks up which version is current, then shares that version's own cache entry: a
        # caller generating data keys and one decrypting them open the key once per TTL, not
        # once each (one root-key provider call per resource key per TTL).
        async with self._sessions() as session:
            ring = await session.get(KeyRingRow, (resource_id, purpose.value))
        if ring is None:
            raise resource_not_found(resource_id)
        return await self.version(resource_id, purpose, ring.current_version)

    async def version(self, resource_id: str, purpose: Purpose, version: int) -> UsableKey:
        """A specific version, for unwrapping."""
        return await self.cache.get(
            (resource_id, purpose.value, version), lambda: self._load(resource_id, purpose, version)
        )

    def forget(self, resource_id: str) -> None:
        """Drops every cached key of a resource (after a state change in this process)."""
        self.cache.invalidate(lambda k: k[0] == resource_id)

    async def _load(self, resource_id: str, purpose: Purpose, version: int | None) -> UsableKey:
        async with self._sessions() as session:
            resource = await session.get(ResourceRow, resource_id)
            if resource is None:
                raise resource_not_found(resource_id)
            if version is None:
                ring = await session.get(KeyRingRow, (resource_id, purpose.value))
                if ring is None:
                    raise resource_not_found(resource_id)
                version = ring.current_version
            # The version comes from an unauthenticated header; SQL stores 32-bit signed ints.
            row = (
                await session.get(KeyVersionRow, (resource_id, purpose.value, version))
                if version <= MAX_STORED_VERSION
                else None
            )
            customer_key = await session.get(CustomerKeyRow, resource_id)
        # The session is closed before any call to the customer's vault.
        name = key_version_name(resource_id, purpose, version)
        if row is None:
            raise NotFound("KEY_VERSION_NOT_FOUND", f"{name} does not exist")
        refusal = resource_refusal(resource) or version_refusal(row, name)
        if refusal is not None:
            return UsableKey(version, name, None, refusal)
        service_root = self.open_root(resource)
        assert row.wrapped_key is not None
        customer = customer_reference(customer_key) if customer_key else None
        root = self.root_of(resource_id, row.root_key_id, customer)
        self.root_key_calls += 1
        try:
            sealed = await root.unwrap(row.wrapped_key)
        except CustomerKeyUnavailable as exc:
            self.root_key_failures += 1
            self._checked(customer, exc.reason)
            # Revocation seen here reaches every cached key of the resource at once (the
            # failures already remembered stay, so the vault is not asked again for them).
            self.cache.invalidate(lambda k: k[0] == resource_id, failures_too=False)
            raise
        except KeybrokerError as exc:
            self.root_key_failures += 1
            self._checked(customer, exc.reason)
            raise
        except Exception:
            self.root_key_failures += 1
            raise
        self._checked(customer, None)
        key = open_resource_key(service_root, row, sealed)
        return UsableKey(version, name, AESGCMSIV(key), None)

    def _checked(self, customer: KeyReference | None, reason: str | None) -> None:
        """Records what a call under a customer-managed key saw (for GetStatus)."""
        if customer is None:
            return
        if reason is None:
            self.checks.succeeded(customer.key_id)
        else:
            self.checks.failed(customer.key_id, reason)

    def root_of(
        self, resource_id: str, root_key_id: str | None, customer: KeyReference | None
    ) -> Root:
        """The root named by a version's `root_key_id`: the service seal alone, or the
        customer's key recorded for the resource (which must be the very version named)."""
        resource = resource_name(resource_id)
        if root_key_id == service_root_key_id(resource_id):
            return Root(root_key_id, resource)
        if customer is None or root_key_id != customer.key_id:
            log.error("version of %s names root %s, which is not its key", resource, root_key_id)
            raise StoredKeyCorrupt
        return Root(customer.key_id, resource, customer, self.providers.get(customer.provider))

    def open_root(self, resource: ResourceRow) -> AESGCM:
        """Unseals a resource's service-managed root key with the master key that sealed it."""
        master = self._master_keys.get(resource.master_key_id or "")
        if resource.root_key_sealed is None or master is None:
            log.error(
                "resource %s has no usable root key (master key %s)",
                resource.id,
                resource.master_key_id,
            )
            raise StoredKeyCorrupt
        try:
            root = key_wrapping.unwrap(
                master.aead, resource.root_key_sealed, ROOT_KEY_LABEL, root_context(resource.id)
            )
        except key_wrapping.UnwrapError:
            log.error("root key of resource %s failed to authenticate", resource.id)
            raise StoredKeyCorrupt from None
        return AESGCM(root)


def customer_reference(row: CustomerKeyRow) -> KeyReference:
    return KeyReference(row.provider, row.vault, row.key_name, row.version, row.identity)


def open_resource_key(service_root: AESGCM, row: KeyVersionRow, sealed: bytes) -> bytes:
    """Unseals one resource-key version's service seal under the resource's service root."""
    context = resource_key_context(row.resource_id, Purpose(row.purpose), row.version)
    try:
        return key_wrapping.unwrap(service_root, sealed, RESOURCE_KEY_LABEL, context)
    except key_wrapping.UnwrapError:
        log.error(
            "resource key %s/%s/v%d failed to authenticate",
            row.resource_id,
            row.purpose,
            row.version,
        )
        raise StoredKeyCorrupt from None
