"""State changes of resources and resource keys: create, delete/undelete, rotate, destroy/restore.

Each change runs in one transaction together with its audit record; on PostgreSQL the rows it
changes are locked (SELECT ... FOR UPDATE), on SQLite every transaction holds the write lock
(BEGIN IMMEDIATE). After commit the process's key cache for the resource is dropped; other
replicas see the change within their cache TTL.

Destruction happens in two steps: a call schedules it after a pending window, and `destroy_due`
(run periodically by the janitor) wipes the key material once the window has passed. A zero window
destroys at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.audit.log import AuditLog
from broker.core.audit_event import AuditEvent
from broker.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from broker.core.names import KeyVersionName, Purpose, key_version_name, resource_name
from broker.db.tables import CustomerKeyRow, KeyRingRow, KeyVersionRow, ResourceRow
from broker.keys import key_wrapping
from broker.keys.key_store import (
    RESOURCE_KEY_LABEL,
    ROOT_KEY_LABEL,
    KeyStore,
    customer_reference,
    resource_key_context,
    resource_not_found,
    root_context,
    service_root_key_id,
)
from broker.keys.master_key import MasterKey
from broker.keys.roots import Root

KEY_SIZE = 32


@dataclass(frozen=True)
class ResourceView:
    """A resource with its key rings, as read in one transaction."""

    resource: ResourceRow
    rings: Sequence[KeyRingRow]
    customer_key: CustomerKeyRow | None = None


@dataclass(frozen=True)
class LifecyclePolicy:
    """The timing rules, from settings."""

    rotation_period: timedelta
    default_pending_window: timedelta
    min_pending_window: timedelta
    max_pending_window: timedelta


class Lifecycle:
    """See the module docstring. `now` is injectable so tests can move time."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        keys: KeyStore,
        audit: AuditLog,
        master_key: MasterKey,
        policy: LifecyclePolicy,
        now: Callable[[], datetime],
    ) -> None:
        self._sessions = sessions
        self._keys = keys
        self._audit = audit
        self._master = master_key
        self._policy = policy
        self._now = now

    # -- resources -------------------------------------------------------------------------

    async def create_resource(
        self, resource_id: str, event: AuditEvent, create_time: datetime | None = None
    ) -> ResourceView:
        """Creates a resource: a sealed root key and version 1 of each purpose's resource key."""
        now = self._now()
        if create_time is not None and create_time > now:
            raise InvalidArgument("INVALID_CREATE_TIME", "create_time is in the future")
        root = os.urandom(KEY_SIZE)
        resource = ResourceRow(
            id=resource_id,
            create_time=create_time or now,
            imported=create_time is not None,
            state="active",
            root_key_sealed=key_wrapping.wrap(
                self._master.aead, root, ROOT_KEY_LABEL, root_context(resource_id)
            ),
            master_key_id=self._master.key_id,
        )
        rings = [
            KeyRingRow(
                resource_id=resource_id,
                purpose=purpose.value,
                current_version=1,
                key_source="service_managed",
                root_key_id=service_root_key_id(resource_id),
                rotation_time=now + self._policy.rotation_period,
            )
            for purpose in Purpose
        ]
        service_root = AESGCM(root)
        plain = Root(service_root_key_id(resource_id), resource_name(resource_id))
        versions = [
            await self.new_version(service_root, plain, resource_id, purpose, 1, now)
            for purpose in Purpose
        ]
        event.key_ids.update(key_version_name(resource_id, p, 1) for p in Purpose)
        try:
            async with self._sessions.begin() as session:
                session.add(resource)
                await session.flush()
                session.add_all(rings)
                await session.flush()
                session.add_all(versions)
                await self._audit.record_in(session, event)
        except IntegrityError:
            raise AlreadyExists(
                "RESOURCE_ALREADY_EXISTS", f"{resource_name(resource_id)} already exists"
            ) from None
        self._keys.forget(resource_id)
        return ResourceView(resource, rings)

    async def get_resource(self, resource_id: str) -> ResourceView:
        async with self._sessions() as session:
            resource = await session.get(ResourceRow, resource_id)
            if resource is None:
                raise resource_not_found(resource_id)
            rings = await _rings(session, resource_id)
            customer_key = await session.get(CustomerKeyRow, resource_id)
            return ResourceView(resource, rings, customer_key)

    async def list_resources(self, after: str, limit: int) -> list[ResourceView]:
        """Resources with id > after, in id order, at most `limit`."""
        async with self._sessions() as session:
            rows = (
                await session.scalars(
                    select(ResourceRow)
                    .where(ResourceRow.id > after)
                    .order_by(ResourceRow.id)
                    .limit(limit)
                )
            ).all()
            ids = [r.id for r in rows]
            rings = (
                await session.scalars(
                    select(KeyRingRow)
                    .where(KeyRingRow.resource_id.in_(ids))
                    .order_by(KeyRingRow.resource_id, KeyRingRow.purpose)
                )
            ).all()
            customer_keys = {
                c.resource_id: c
                for c in await session.scalars(
                    select(CustomerKeyRow).where(CustomerKeyRow.resource_id.in_(ids))
                )
            }
        by_id: dict[str, list[KeyRingRow]] = {i: [] for i in ids}
        for ring in rings:
            by_id[ring.resource_id].append(ring)
        return [ResourceView(r, by_id[r.id], customer_keys.get(r.id)) for r in rows]

    async def delete_resource(
        self, resource_id: str, window: timedelta | None, event: AuditEvent
    ) -> ResourceView:
        """Schedules destruction after `window` (None: the default); zero destroys at once."""
        window = self._check_window(window)
        now = self._now()
        async with self._sessions.begin() as session:
            resource = await _lock_resource(session, resource_id)
            if resource.state != "active":
                raise FailedPrecondition(
                    "RESOURCE_NOT_ACTIVE",
                    f"{resource_name(resource_id)} is already {resource.state}",
                )
            resource.state = "delete_scheduled"
            resource.purge_time = now + window
            if not window:
                await _destroy_resource(session, resource, now)
            await self._audit.record_in(session, event)
            rings = await _rings(session, resource_id)
            customer_key = await session.get(CustomerKeyRow, resource_id)
        self._keys.forget(resource_id)
        return ResourceView(resource, rings, customer_key)

    async def undelete_resource(self, resource_id: str, event: AuditEvent) -> ResourceView:
        async with self._sessions.begin() as session:
            resource = await _lock_resource(session, resource_id)
            if resource.state != "delete_scheduled":
                raise FailedPrecondition(
                    "RESOURCE_NOT_DELETE_SCHEDULED",
                    f"{resource_name(resource_id)} is {resource.state}, not scheduled for deletion",
                )
            resource.state = "active"
            resource.purge_time = None
            await self._audit.record_in(session, event)
            rings = await _rings(session, resource_id)
            customer_key = await session.get(CustomerKeyRow, resource_id)
        self._keys.forget(resource_id)
        return ResourceView(resource, rings, customer_key)

    # -- resource keys ---------------------------------------------------------------------

    async def rotate(self, resource_id: str, purpose: Purpose, event: AuditEvent) -> KeyVersionRow:
        """Makes a new version current; older versions keep unwrapping until destroyed."""
        now = self._now()
        async with self._sessions.begin() as session:
            resource = await _lock_resource(session, resource_id)
            if resource.state != "active":
                raise FailedPrecondition(
                    "RESOURCE_NOT_ACTIVE", f"{resource_name(resource_id)} is {resource.state}"
                )
            ring = await session.get(KeyRingRow, (resource_id, purpose.value), with_for_update=True)
            assert ring is not None
            customer_key = await session.get(CustomerKeyRow, resource_id)
            customer = customer_reference(customer_key) if customer_key else None
            root = self._keys.root_of(resource_id, ring.root_key_id, customer)
            service_root = self._keys.open_root(resource)
            row = await self.new_version(
                service_root, root, resource_id, purpose, ring.current_version + 1, now
            )
            session.add(row)
            ring.current_version = row.version
            ring.rotation_time = now + self._policy.rotation_period
            event.key_ids.add(key_version_name(resource_id, purpose, row.version))
            await self._audit.record_in(session, event)
        self._keys.forget(resource_id)
        return row

    async def list_versions(
        self, resource_id: str, purpose: Purpose, before: int | None, limit: int
    ) -> tuple[KeyRingRow, list[KeyVersionRow]]:
        """Versions newest first, those below `before` when given."""
        async with self._sessions() as session:
            ring = await session.get(KeyRingRow, (resource_id, purpose.value))
            if ring is None:
                raise resource_not_found(resource_id)
            query = select(KeyVersionRow).where(
                KeyVersionRow.resource_id == resource_id, KeyVersionRow.purpose == purpose.value
            )
            if before is not None:
                query = query.where(KeyVersionRow.version < before)
            rows = (
                await session.scalars(query.order_by(KeyVersionRow.version.desc()).limit(limit))
            ).all()
        return ring, list(rows)

    async def destroy_version(
        self, name: KeyVersionName, window: timedelta | None, event: AuditEvent
    ) -> tuple[KeyRingRow, KeyVersionRow]:
        """Schedules destruction of a non-current version; zero window destroys at once."""
        window = self._check_window(window)
        now = self._now()
        async with self._sessions.begin() as session:
            ring, row = await _lock_version(session, name)
            if row.version == ring.current_version:
                raise FailedPrecondition(
                    "KEY_VERSION_IS_CURRENT", f"{name} is current: rotate the key first"
                )
            if row.state != "enabled":
                raise FailedPrecondition("KEY_VERSION_NOT_ENABLED", f"{name} is {row.state}")
            row.state = "destroy_scheduled"
            row.destroy_time = now + window
            if not window:
                _wipe_version(row, now)
            await self._audit.record_in(session, event)
        self._keys.forget(name.resource_id)
        return ring, row

    async def restore_version(
        self, name: KeyVersionName, event: AuditEvent
    ) -> tuple[KeyRingRow, KeyVersionRow]:
        async with self._sessions.begin() as session:
            ring, row = await _lock_version(session, name)
            if row.state != "destroy_scheduled":
                raise FailedPrecondition(
                    "KEY_VERSION_NOT_DESTROY_SCHEDULED", f"{name} is {row.state}, not scheduled"
                )
            row.state = "enabled"
            row.destroy_time = None
            await self._audit.record_in(session, event)
        self._keys.forget(name.resource_id)
        return ring, row

    # -- periodic work (the janitor) -----------------------------------------------------------

    async def destroy_due(self, event: Callable[[str, str], AuditEvent]) -> tuple[int, int]:
        """Destroys versions and resources whose pending window has passed; returns the counts.

        Idempotent, and safe against a concurrent restore: each row is re-checked under lock.
        """
        now = self._now()
        versions = resources = 0
        async with self._sessions() as session:
            due_versions = (
                await session.execute(
                    select(KeyVersionRow.resource_id, KeyVersionRow.purpose, KeyVersionRow.version)
                    .where(
                        KeyVersionRow.state == "destroy_scheduled",
                        KeyVersionRow.destroy_time <= now,
                    )
                    .limit(1000)
                )
            ).all()
            due_resources = (
                await session.scalars(
                    select(ResourceRow.id)
                    .where(ResourceRow.state == "delete_scheduled", ResourceRow.purge_time <= now)
                    .limit(1000)
                )
            ).all()
        for resource_id, purpose, version in due_versions:
            name = KeyVersionName(resource_id, Purpose(purpose), version)
            async with self._sessions.begin() as session:
                try:
                    _, row = await _lock_version(session, name)
                except NotFound:
                    continue
                if (
                    row.state != "destroy_scheduled"
                    or row.destroy_time is None
                    or row.destroy_time > now
                ):
                    continue
                _wipe_version(row, now)
                ev = event("DestroyResourceKeyVersionMaterial", resource_name(resource_id))
                ev.key_ids.add(str(name))
                await self._audit.record_in(session, ev)
            self._keys.forget(resource_id)
            versions += 1
        for resource_id in due_resources:
            async with self._sessions.begin() as session:
                resource = await session.get(ResourceRow, resource_id, with_for_update=True)
                if resource is None or resource.state != "delete_scheduled":
                    continue
                if resource.purge_time is None or resource.purge_time > now:
                    continue
                await _destroy_resource(session, resource, now)
                await self._audit.record_in(
                    session, event("DestroyResource", resource_name(resource_id))
                )
            self._keys.forget(resource_id)
            resources += 1
        return versions, resources

    async def rotate_due(self, event: Callable[[str, str], AuditEvent]) -> int:
        """Rotates every active resource key whose current version is older than the period."""
        now = self._now()
        async with self._sessions() as session:
            due = (
                await session.execute(
                    select(KeyRingRow.resource_id, KeyRingRow.purpose)
                    .join(ResourceRow, ResourceRow.id == KeyRingRow.resource_id)
                    .where(KeyRingRow.rotation_time <= now, ResourceRow.state == "active")
                    .limit(1000)
                )
            ).all()
        rotated = 0
        for resource_id, purpose in due:
            async with self._sessions() as session:
                ring = await session.get(KeyRingRow, (resource_id, purpose))
                if ring is None or ring.rotation_time > now:
                    continue  # another replica rotated it meanwhile
            await self.rotate(
                resource_id,
                Purpose(purpose),
                event("RotateResourceKey", resource_name(resource_id)),
            )
            rotated += 1
        return rotated

    # -- helpers ---------------------------------------------------------------------------------

    def _check_window(self, window: timedelta | None) -> timedelta:
        if window is None:
            return self._policy.default_pending_window
        low, high = self._policy.min_pending_window, self._policy.max_pending_window
        if not low <= window <= high:
            raise InvalidArgument(
                "INVALID_PENDING_WINDOW",
                f"pending_window must be between {low.total_seconds():.0f}s and "
                f"{high.total_seconds():.0f}s",
            )
        return window

    async def new_version(
        self,
        service_root: AESGCM,
        root: Root,
        resource_id: str,
        purpose: Purpose,
        version: int,
        now: datetime,
    ) -> KeyVersionRow:
        """A fresh resource-key version: sealed by the service root, stored under `root`."""
        sealed = key_wrapping.wrap(
            service_root,
            os.urandom(KEY_SIZE),
            RESOURCE_KEY_LABEL,
            resource_key_context(resource_id, purpose, version),
        )
        return KeyVersionRow(
            resource_id=resource_id,
            purpose=purpose.value,
            version=version,
            state="enabled",
            create_time=now,
            wrapped_key=await root.wrap(sealed),
            root_key_id=root.key_id,
        )


async def _rings(session: AsyncSession, resource_id: str) -> list[KeyRingRow]:
    return list(
        (
            await session.scalars(
                select(KeyRingRow)
                .where(KeyRingRow.resource_id == resource_id)
                .order_by(KeyRingRow.purpose)
            )
        ).all()
    )


async def _lock_resource(session: AsyncSession, resource_id: str) -> ResourceRow:
    resource = await session.get(ResourceRow, resource_id, with_for_update=True)
    if resource is None:
        raise resource_not_found(resource_id)
    return resource


async def _lock_version(
    session: AsyncSession, name: KeyVersionName
) -> tuple[KeyRingRow, KeyVersionRow]:
    ring = await session.get(KeyRingRow, (name.resource_id, name.purpose.value))
    if ring is None:
        raise resource_not_found(name.resource_id)
    row = await session.get(
        KeyVersionRow, (name.resource_id, name.purpose.value, name.version), with_for_update=True
    )
    if row is None:
        raise NotFound("KEY_VERSION_NOT_FOUND", f"{name} does not exist")
    return ring, row


def _wipe_version(row: KeyVersionRow, now: datetime) -> None:
    row.state = "destroyed"
    row.wrapped_key = None
    row.root_key_id = None
    row.destroy_time = row.destroy_time or now
    row.destroy_event_time = now


async def _destroy_resource(session: AsyncSession, resource: ResourceRow, now: datetime) -> None:
    """Wipes the root key and every version: nothing of the resource can be unwrapped again."""
    resource.state = "destroyed"
    resource.root_key_sealed = None
    resource.master_key_id = None
    resource.destroy_time = now
    await session.execute(delete(CustomerKeyRow).where(CustomerKeyRow.resource_id == resource.id))
    await session.execute(
        update(KeyVersionRow)
        .where(KeyVersionRow.resource_id == resource.id, KeyVersionRow.state != "destroyed")
        .values(state="destroyed", wrapped_key=None, root_key_id=None, destroy_event_time=now)
        .execution_options(synchronize_session=False)
    )
