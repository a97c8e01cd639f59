"""Opening the master key at start, and rotating it offline (`keybroker master-key rotate`).

At start the key file must exist whenever the database holds sealed root keys, and must be the key
that sealed them; on a fresh database a new key file is created (mode 0600).

Rotation writes a new key to `master.key.next`, re-seals every root key under it in one
transaction (nothing below the root keys changes), and only then renames it over `master.key`. A
crash before the commit leaves the old key in force (the stale `.next` file is discarded at the
next start); a crash after it is completed at the next start, which finds the database sealed under
the `.next` key.

With `master_key_pkcs11_label` set the master key lives in a PKCS#11 token instead
(broker.master_key_pkcs11) and key files play no part. At start the token must hold every key the
database names under that label; on a fresh database with no key under the label, CKA_ID 01 is
generated in the token. The newest version (greatest CKA_ID) is the master key, unless the database
is sealed under an older one alone: then a rotation generated the newer key but did not commit,
and the database's key stays in force. Rotation generates the next CKA_ID, re-seals every root key
under it in one transaction, and leaves the old key in the token for the customer or admin to
destroy once no database backup needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker import audit_chain, master_key, master_key_pkcs11, sealing
from broker.audit import AuditEvent, AuditLog
from broker.db.models import ResourceRow
from broker.errors import ConfigurationError
from broker.keys import ROOT_KEY_LABEL, root_context
from broker.master_key import MasterKey
from broker.settings import Settings

log = logging.getLogger(__name__)
_BATCH = 500
_RESOURCES = cast(Table, ResourceRow.__table__)


async def _referenced_ids(sessions: async_sessionmaker[AsyncSession]) -> set[str]:
    async with sessions() as session:
        ids = await session.scalars(
            select(ResourceRow.master_key_id)
            .where(ResourceRow.master_key_id.is_not(None))
            .distinct()
        )
        return {i for i in ids if i is not None}


async def open_master_key(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> MasterKey:
    """The master key for this data directory and database; see the module docstring."""
    if settings.master_key_pkcs11_label:
        keys = master_key_pkcs11.token_keys(settings)
        return _open_token_key(keys, await _referenced_ids(sessions))
    path = settings.master_key_file
    next_path = path.with_name(master_key.NEXT_FILE_NAME)
    referenced = await _referenced_ids(sessions)
    if next_path.exists():
        _settle_interrupted_rotation(path, next_path, referenced)
    if not path.exists():
        if referenced:
            raise ConfigurationError(
                f"master key file {path} is missing but the database holds root keys sealed by "
                f"{', '.join(sorted(referenced))}: restore the file (from your key backup)"
            )
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = master_key.write_new(path)
        log.info("created master key %s in %s", key.key_id, path)
        return key
    key = master_key.load(path)
    unknown = referenced - {key.key_id}
    if unknown:
        raise ConfigurationError(
            f"master key file {path} holds {key.key_id}, but the database holds root keys sealed "
            f"by {', '.join(sorted(unknown))}: this is not the database's master key file"
        )
    return key


def _open_token_key(keys: master_key_pkcs11.TokenKeys, referenced: set[str]) -> MasterKey:
    """The master key in the token; see the module docstring."""
    where = f"PKCS#11 token {keys.token_label!r} under label {keys.key_label!r}"
    versions = keys.versions()
    if not versions:
        if referenced:
            raise ConfigurationError(
                f"{where} holds no master key, but the database holds root keys sealed by "
                f"{', '.join(sorted(referenced))}: restore the key in the token (from its backup) "
                "or correct master_key_pkcs11_token/master_key_pkcs11_label"
            )
        key = keys.generate(master_key_pkcs11.FIRST_VERSION)
        log.info("created master key %s in the PKCS#11 token", key.key_id)
        return key
    held = {keys.key_id(v): v for v in versions}
    unknown = referenced - held.keys()
    if unknown:
        raise ConfigurationError(
            f"the database holds root keys sealed by {', '.join(sorted(unknown))}, which "
            f"{where} does not hold (it holds {', '.join(held)}): this is not the database's "
            "master key"
        )
    current = versions[-1]
    if referenced and referenced != {keys.key_id(current)}:
        if len(referenced) > 1:
            raise ConfigurationError(
                f"the database holds root keys sealed by several master keys "
                f"({', '.join(sorted(referenced))}); the broker uses one at a time"
            )
        (in_force,) = referenced
        log.warning(
            "master key %s is newer than %s, which seals every root key: it is left from a master "
            "key rotation that did not commit, so %s stays in force (rotate again; the unused "
            "key may be destroyed in the token)",
            keys.key_id(current),
            in_force,
            in_force,
        )
        current = held[in_force]
    return keys.check(current)


def _settle_interrupted_rotation(path: Path, next_path: Path, referenced: set[str]) -> None:
    """Completes a rotation whose database commit happened, or discards one whose did not.

    The new key file is fsynced before the database is re-sealed, so a file that does not parse
    (torn write) cannot be the key the database names; it is discarded only when the database
    needs nothing but the current key file, and never when that would leave a key missing.
    """
    try:
        pending: MasterKey | None = master_key.load(next_path)
    except ConfigurationError:
        pending = None
    if pending is not None and referenced and referenced == {pending.key_id}:
        log.warning("completing an interrupted master key rotation to %s", pending.key_id)
        master_key.replace(next_path, path)
        return
    current = master_key.load(path) if path.exists() else None
    if referenced <= ({current.key_id} if current else set()):
        log.warning("discarding %s from a master key rotation that did not commit", next_path)
        next_path.unlink()
        return
    raise ConfigurationError(
        f"{next_path} is left from an interrupted master key rotation, and neither it nor "
        f"{path} holds every key the database names ({', '.join(sorted(referenced))}): "
        "restore the master key file from your backup"
    )


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
        count = await _reseal(sessions, audit, event, old, new)
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
    old = _open_token_key(keys, await _referenced_ids(sessions))
    await _chain_audit(settings, sessions, audit, old)
    new = keys.generate(master_key_pkcs11.next_version(keys.versions()))
    try:
        count = await _reseal(sessions, audit, event, old, new)
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
    key = await audit_chain.open_audit_key(sessions, master, datetime.now(UTC))
    audit.use_key(key, audit_chain.checkpoint_path(settings.data_dir, audit.writer))


async def _reseal(
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
                    root = sealing.unseal(old.aead, sealed, ROOT_KEY_LABEL, context)
                except sealing.UnsealError:
                    raise ConfigurationError(
                        f"root key of {resource_id} does not open under {old.key_id}: "
                        "the database was tampered with; nothing was changed"
                    ) from None
                params.append(
                    {
                        "rid": resource_id,
                        "sealed": sealing.seal(new.aead, root, ROOT_KEY_LABEL, context),
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
        await audit_chain.reseal_audit_keys(session, old, new)
        ev = event()
        ev.key_ids.update({old.key_id, new.key_id})
        ev.item_count = count
        await audit.record_in(session, ev)
    audit.checkpoint()
    return count
