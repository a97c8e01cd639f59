"""Rotating the master key offline (`keybroker master-key rotate`).

Rotation writes a new key to `master.key.next`, re-wraps every root key under it in one
transaction (nothing below the root keys changes), and only then renames it over `master.key`. A
crash before the commit leaves the old key in force (the stale `.next` file is discarded at the
next start); a crash after it is completed at the next start, which finds the database wrapped under
the `.next` key (broker.keys.master_key_setup).

With `master_key_pkcs11_label` set, rotation generates the next CKA_ID in the token, re-wraps every
root key under it in one transaction, and leaves the old key in the token for the customer or admin
to destroy once no database backup needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.audit import chain
from broker.audit.log import AuditLog
from broker.core.audit_event import AuditEvent
from broker.core.errors import ConfigurationError
from broker.core.settings import Settings
from broker.db.tables import ResourceRow
from broker.keys import key_wrapping, master_key, master_key_pkcs11
from broker.keys.key_store import ROOT_KEY_LABEL, root_context
from broker.keys.master_key import MasterKey
from broker.keys.master_key_setup import (
    open_master_key,
    open_token_key,
    referenced_master_key_ids,
)

log = logging.getLogger(__name__)
_BATCH = 500
_RESOURCES = cast(Table, ResourceRow.__table__)


async def rotate_master_key(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    audit: AuditLog,
    event: Callable[[], AuditEvent],
) -> tuple[str, str, int]:
    """Re-seals every root key under a new master key; returns (old id, new id, count)."""
    if settings.master_key_pkcs11_label:
        return await _rotate_token_key(settings, sessions, audit, event)
    old = await open_master_key(settings, sessions)
    await _chain_audit(settings, sessions, audit, old)
    next_path = settings.master_key_file.with_name(master_key.NEXT_FILE_NAME)
    new = master_key.write_new(next_path)
    try:
        count = await _rewrap_root_keys(sessions, audit, event, old, new)
    except BaseException:
        next_path.unlink(missing_ok=True)
        raise
    master_key.replace(next_path, settings.master_key_file)
    log.info(
        "master key rotated from %s to %s (%d root keys re-sealed) at %s",
        old.key_id,
        new.key_id,
        count,
        datetime.now(UTC).isoformat(),
    )
    return old.key_id, new.key_id, count


async def _rotate_token_key(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    audit: AuditLog,
    event: Callable[[], AuditEvent],
) -> tuple[str, str, int]:
    keys = master_key_pkcs11.token_keys(settings)
    old = open_token_key(keys, await referenced_master_key_ids(sessions))
    await _chain_audit(settings, sessions, audit, old)
    new = keys.generate(master_key_pkcs11.next_version(keys.versions()))
    try:
        count = await _rewrap_root_keys(sessions, audit, event, old, new)
    except master_key_pkcs11.MasterKeyError as exc:
        raise ConfigurationError(
            f"master key rotation failed, nothing was changed: {exc.detail}; {new.key_id} is left "
            "unused in the token"
        ) from None
    except BaseException:
        log.warning(
            "master key rotation failed: %s stays in force; %s is left unused in the token",
            old.key_id,
            new.key_id,
        )
        raise
    log.info(
        "master key rotated from %s to %s (%d root keys re-sealed) at %s; %s stays in the token: "
        "the customer or admin may destroy it there once no database backup needs it",
        old.key_id,
        new.key_id,
        count,
        datetime.now(UTC).isoformat(),
        old.key_id,
    )
    return old.key_id, new.key_id, count


async def _chain_audit(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    audit: AuditLog,
    master: MasterKey,
) -> None:
    """Chains the rotation's own audit record (before the audit keys are re-sealed)."""
    key = await chain.open_audit_key(sessions, master, datetime.now(UTC))
    audit.use_key(key, chain.checkpoint_path(settings.data_dir, audit.writer))


async def _rewrap_root_keys(
    sessions: async_sessionmaker[AsyncSession],
    audit: AuditLog,
    event: Callable[[], AuditEvent],
    old: MasterKey,
    new: MasterKey,
) -> int:
    """Re-seals every root key sealed by `old` under `new`, in one transaction; returns how many."""
    count = 0
    async with sessions.begin() as session:
        after = ""
        while True:
            rows = (
                await session.execute(
                    select(ResourceRow.id, ResourceRow.root_key_sealed)
                    .where(ResourceRow.id > after, ResourceRow.master_key_id == old.key_id)
                    .order_by(ResourceRow.id)
                    .limit(_BATCH)
                    .with_for_update()
                )
            ).all()
            if not rows:
                break
            params = []
            for resource_id, sealed in rows:
                assert sealed is not None  # master_key_id is set only beside a sealed key
                context = root_context(resource_id)
                try:
                    root = key_wrapping.unwrap(old.aead, sealed, ROOT_KEY_LABEL, context)
                except key_wrapping.UnwrapError:
                    raise ConfigurationError(
                        f"root key of {resource_id} does not open under {old.key_id}: "
                        "the database was tampered with; nothing was changed"
                    ) from None
                params.append(
                    {
                        "rid": resource_id,
                        "sealed": key_wrapping.wrap(new.aead, root, ROOT_KEY_LABEL, context),
                    }
                )
            await session.execute(
                update(_RESOURCES)
                .where(_RESOURCES.c.id == bindparam("rid"))
                .values(root_key_sealed=bindparam("sealed"), master_key_id=new.key_id),
                params,
            )
            count += len(rows)
            after = rows[-1][0]
        # The audit keys move with the root keys: the HMACs of old records still verify.
        await chain.rewrap_audit_keys(session, old, new)
        ev = event()
        ev.key_ids.update({old.key_id, new.key_id})
        ev.item_count = count
        await audit.record_in(session, ev)
    audit.checkpoint()
    return count
