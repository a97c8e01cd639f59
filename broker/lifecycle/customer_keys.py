"""The customer-managed key lifecycle of a resource: enable, update (rotate or move), disable,
and following a key's latest version.

Each change checks the new key first (type and size, a wrap+unwrap probe with this identity,
a recoverable vault where the provider can tell), then, in one transaction with its audit record,
moves the outer layer of every stored resource-key version of the affected purposes to the new
root (broker.keys.roots) and, except for a plain rotation, starts a fresh version for new data.
The old wrapped copies are overwritten in that transaction, so a revocation of the old key covers
old data at once. No object and no resource key is rewritten.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.audit.log import AuditLog
from broker.core.audit_event import AuditEvent
from broker.core.errors import FailedPrecondition, InvalidArgument, KeybrokerError
from broker.core.names import Purpose, key_version_name, resource_name
from broker.db.tables import CustomerKeyRow, KeyRingRow, KeyVersionRow, ResourceRow
from broker.keys.key_store import (
    KeyStore,
    customer_reference,
    resource_not_found,
    service_root_key_id,
)
from broker.keys.roots import Root, describe_error
from broker.lifecycle.resources import Lifecycle, ResourceView
from broker.providers import KeyReference, ProviderError
from broker.providers.registry import PROVIDERS

log = logging.getLogger(__name__)

RSA_SIZES = (2048, 3072, 4096)
FULL_SCOPE = "models,results"
LEGACY_SCOPE = "models"
_FIELD_LIMITS = {"vault": 512, "key_name": 256, "version": 256, "identity": 256}


def check_reference(
    provider: str, vault: str, key_name: str, version: str, identity: str, follow_latest: bool
) -> KeyReference:
    """Validates the fields of a CustomerKeyReference."""
    if not provider:
        raise InvalidArgument("MISSING_FIELD", "key.provider is required")
    if provider not in PROVIDERS:
        raise InvalidArgument(
            "UNKNOWN_KEY_PROVIDER", f"key.provider must be one of {', '.join(PROVIDERS)}"
        )
    values = {"vault": vault, "key_name": key_name, "version": version, "identity": identity}
    for field, value in values.items():
        if len(value) > _FIELD_LIMITS[field]:
            raise InvalidArgument(
                "FIELD_TOO_LONG", f"key.{field} is longer than {_FIELD_LIMITS[field]} characters"
            )
        if any(ord(c) < 0x20 for c in value):
            raise InvalidArgument("INVALID_KEY_REFERENCE", f"key.{field} has control characters")
    if not vault:
        raise InvalidArgument("MISSING_FIELD", "key.vault is required")
    if not key_name:
        raise InvalidArgument("MISSING_FIELD", "key.key_name is required")
    if not version and not follow_latest:
        raise InvalidArgument("MISSING_FIELD", "key.version is required unless follow_latest")
    return KeyReference(provider, vault, key_name, version, identity)


def scope_purposes(scope: str) -> tuple[Purpose, ...]:
    return tuple(Purpose(p) for p in scope.split(","))


class CustomerKeys:
    """See the module docstring."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        keys: KeyStore,
        lifecycle: Lifecycle,
        audit: AuditLog,
        cutoff: date,
        poll_interval: timedelta,
        now: Callable[[], datetime],
    ) -> None:
        self._sessions = sessions
        self._keys = keys
        self._lifecycle = lifecycle
        self._audit = audit
        self._cutoff = datetime.combine(cutoff, time(), UTC)
        self._poll_interval = poll_interval
        self._now = now

    async def check_key(self, reference: KeyReference) -> KeyReference:
        """Resolves the version (latest when none) and checks the key can be a root key:
        type and size, enabled, recoverable where the provider tells, and a wrap+unwrap probe."""
        provider = self._keys.providers.get(reference.provider)
        try:
            description = await provider.describe(reference)
        except ProviderError as exc:
            raise describe_error(exc, reference) from None
        resolved = description.reference
        kind = (description.key_type, description.key_size)
        # A Managed HSM does not report an oct key's size (0 here); its A256KW probe below
        # succeeds only with a 256-bit key.
        aes_ok = kind in (("AES", 256), ("AES", 0))
        if not (aes_ok or (kind[0] == "RSA" and kind[1] in RSA_SIZES)):
            raise FailedPrecondition(
                "UNSUPPORTED_CUSTOMER_KEY",
                f"{resolved.key_id} is {kind[0]}-{kind[1]}: use RSA 2048/3072/4096 or AES-256",
            )
        if not description.enabled:
            raise FailedPrecondition("CUSTOMER_KEY_UNAVAILABLE", f"{resolved.key_id} is disabled")
        if description.recoverable is False:
            raise FailedPrecondition(
                "CUSTOMER_KEY_VAULT_NOT_RECOVERABLE",
                f"the vault of {resolved.key_id} must have soft delete and purge protection on",
            )
        probe = os.urandom(32)
        try:
            opened = await provider.unwrap(resolved, await provider.wrap(resolved, probe))
        except ProviderError as exc:
            raise describe_error(exc, resolved) from None
        if opened != probe:
            raise FailedPrecondition(
                "CUSTOMER_KEY_PROBE_FAILED", f"{resolved.key_id} did not unwrap what it wrapped"
            )
        return resolved

    async def enable(
        self,
        resource_id: str,
        reference: KeyReference,
        follow_latest: bool,
        event: AuditEvent,
        *,
        scope: str = FULL_SCOPE,
    ) -> ResourceView:
        """Puts the resource's purposes in `scope` under the customer's key."""
        resolved = await self.check_key(reference)
        event.key_ids.add(resolved.key_id)
        async with self._sessions.begin() as session:
            resource = await self._lock_active(session, resource_id)
            if resource.create_time < self._cutoff:
                raise FailedPrecondition(
                    "RESOURCE_CREATED_BEFORE_CMK_CUTOFF",
                    f"customer-managed keys need a resource created on or after "
                    f"{self._cutoff.date().isoformat()}: create a new resource",
                )
            if await session.get(CustomerKeyRow, resource_id) is not None:
                raise FailedPrecondition(
                    "CUSTOMER_KEY_ALREADY_ENABLED",
                    f"{resource_name(resource_id)} already has a customer-managed key: update it",
                )
            session.add(
                CustomerKeyRow(
                    resource_id=resource_id,
                    provider=resolved.provider,
                    vault=resolved.vault,
                    key_name=resolved.key_name,
                    version=resolved.version,
                    identity=resolved.identity,
                    follow_latest=follow_latest,
                    scope=scope,
                    enable_time=self._now(),
                    checked_time=self._now(),
                )
            )
            new_root = self._customer_root(resource_id, resolved)
            purposes = scope_purposes(scope)
            await self._move(session, resource, purposes, None, new_root, event, fresh=True)
            await self._audit.record_in(session, event)
        return await self._done(resource_id)

    async def update(
        self, resource_id: str, reference: KeyReference, follow_latest: bool, event: AuditEvent
    ) -> ResourceView:
        """Another version of the same key re-wraps only; another key also starts a fresh
        version for new data."""
        resolved = await self.check_key(reference)
        event.key_ids.add(resolved.key_id)
        async with self._sessions.begin() as session:
            resource = await self._lock_active(session, resource_id)
            row = await self._customer_key(session, resource_id)
            current = customer_reference(row)
            same_key = (current.provider, current.vault, current.key_name) == (
                resolved.provider,
                resolved.vault,
                resolved.key_name,
            )
            event.key_ids.add(current.key_id)
            row.provider, row.vault, row.key_name = (
                resolved.provider,
                resolved.vault,
                resolved.key_name,
            )
            row.version, row.identity = resolved.version, resolved.identity
            row.follow_latest, row.checked_time = follow_latest, self._now()
            if resolved.key_id != current.key_id:
                new_root = self._customer_root(resource_id, resolved)
                purposes = scope_purposes(row.scope)
                await self._move(
                    session, resource, purposes, current, new_root, event, fresh=not same_key
                )
            await self._audit.record_in(session, event)
        return await self._done(resource_id)

    async def disable(self, resource_id: str, event: AuditEvent) -> ResourceView:
        """Back to service-managed keys: re-wraps every version and starts fresh ones."""
        async with self._sessions.begin() as session:
            resource = await self._lock_active(session, resource_id)
            row = await self._customer_key(session, resource_id)
            event.key_ids.add(customer_reference(row).key_id)
            service = Root(service_root_key_id(resource_id), resource_name(resource_id))
            purposes, current = scope_purposes(row.scope), customer_reference(row)
            await self._move(session, resource, purposes, current, service, event, fresh=True)
            await session.delete(row)
            await self._audit.record_in(session, event)
        return await self._done(resource_id)

    async def poll_latest(self, event: Callable[[str, str], AuditEvent]) -> int:
        """Moves resources that follow their key's latest version to it; returns how many moved.
        Each key is asked at most once per poll interval; failures are logged and retried."""
        now = self._now()
        async with self._sessions() as session:
            due = (
                await session.scalars(
                    select(CustomerKeyRow).where(
                        CustomerKeyRow.follow_latest.is_(True),
                        (CustomerKeyRow.checked_time.is_(None))
                        | (CustomerKeyRow.checked_time <= now - self._poll_interval),
                    )
                )
            ).all()
        moved = 0
        for row in due:
            current = customer_reference(row)
            try:
                provider = self._keys.providers.get(current.provider)
                try:
                    latest = (await provider.describe(current.at(""))).reference
                except ProviderError as exc:
                    raise describe_error(exc, current) from None
                if latest.version == current.version:
                    async with self._sessions.begin() as session:
                        fresh = await session.get(CustomerKeyRow, row.resource_id)
                        if fresh is not None:
                            fresh.checked_time = now
                    continue
                ev = event("RotateCustomerManagedKey", resource_name(row.resource_id))
                # update() runs the full checks (type, size, probe) on the new version.
                await self.update(row.resource_id, latest, True, ev)
                moved += 1
            except KeybrokerError as exc:
                log.warning("following the latest version of %s failed: %s", current.key_id, exc)
        return moved

    # -- helpers -------------------------------------------------------------------------------

    def _customer_root(self, resource_id: str, reference: KeyReference) -> Root:
        provider = self._keys.providers.get(reference.provider)
        return Root(reference.key_id, resource_name(resource_id), reference, provider)

    async def _lock_active(self, session: AsyncSession, resource_id: str) -> ResourceRow:
        resource = await session.get(ResourceRow, resource_id, with_for_update=True)
        if resource is None:
            raise resource_not_found(resource_id)
        if resource.state != "active":
            raise FailedPrecondition(
                "RESOURCE_NOT_ACTIVE", f"{resource_name(resource_id)} is {resource.state}"
            )
        return resource

    async def _customer_key(self, session: AsyncSession, resource_id: str) -> CustomerKeyRow:
        row = await session.get(CustomerKeyRow, resource_id, with_for_update=True)
        if row is None:
            raise FailedPrecondition(
                "CUSTOMER_KEY_NOT_ENABLED",
                f"{resource_name(resource_id)} has no customer-managed key",
            )
        return row

    async def _move(
        self,
        session: AsyncSession,
        resource: ResourceRow,
        purposes: Sequence[Purpose],
        old_customer: KeyReference | None,
        new_root: Root,
        event: AuditEvent,
        *,
        fresh: bool,
    ) -> None:
        """Re-wraps the outer layer of every stored version of `purposes` (each under the
        service seal or `old_customer`) under `new_root`; with `fresh`, also starts a new
        current version under it."""
        service_root = self._keys.open_root(resource)
        now = self._now()
        for purpose in purposes:
            ring = await session.get(KeyRingRow, (resource.id, purpose.value), with_for_update=True)
            assert ring is not None
            versions = (
                await session.scalars(
                    select(KeyVersionRow)
                    .where(
                        KeyVersionRow.resource_id == resource.id,
                        KeyVersionRow.purpose == purpose.value,
                        KeyVersionRow.wrapped_key.is_not(None),
                    )
                    .with_for_update()
                )
            ).all()
            for version in versions:
                assert version.wrapped_key is not None
                old_root = self._keys.root_of(resource.id, version.root_key_id, old_customer)
                if old_root.key_id == new_root.key_id:
                    continue
                sealed = await old_root.unwrap(version.wrapped_key)
                version.wrapped_key = await new_root.wrap(sealed)
                version.root_key_id = new_root.key_id
                event.key_ids.add(old_root.key_id)
            ring.root_key_id = new_root.key_id
            ring.key_source = (
                "service_managed" if new_root.customer_key is None else "customer_managed"
            )
            if fresh:
                row = await self._lifecycle.new_version(
                    service_root, new_root, resource.id, purpose, ring.current_version + 1, now
                )
                session.add(row)
                ring.current_version = row.version
                event.key_ids.add(key_version_name(resource.id, purpose, row.version))
        self._keys.forget(resource.id)

    async def _done(self, resource_id: str) -> ResourceView:
        self._keys.forget(resource_id)
        return await self._lifecycle.get_resource(resource_id)
