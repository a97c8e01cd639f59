"""Opening the master key at start (rotating it is broker.lifecycle.master_key_rotation).

At start the key file must exist whenever the database holds sealed root keys, and must be the key
that sealed them; on a fresh database a new key file is created (mode 0600).

Rotation writes a new key to `master.key.next`, re-seals every root key under it in one
transaction (nothing below the root keys changes), and only then renames it over `master.key`. A
crash before the commit leaves the old key in force (the stale `.next` file is discarded at the
next start); a crash after it is completed at the next start, which finds the database sealed under
the `.next` key.

With `master_key_pkcs11_label` set the master key lives in a PKCS#11 token instead
(broker.keys.master_key_pkcs11) and key files play no part. At start the token must hold every key
the database names under that label; on a fresh database with no key under the label, CKA_ID 01 is
generated in the token. The newest version (greatest CKA_ID) is the master key, unless the database
is sealed under an older one alone: then a rotation generated the newer key but did not commit,
and the database's key stays in force. Rotation generates the next CKA_ID, re-seals every root key
under it in one transaction, and leaves the old key in the token for the customer or admin to
destroy once no database backup needs it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.core.errors import ConfigurationError
from broker.core.settings import Settings
from broker.db.tables import ResourceRow
from broker.keys import master_key, master_key_pkcs11
from broker.keys.master_key import MasterKey

log = logging.getLogger(__name__)


async def referenced_master_key_ids(sessions: async_sessionmaker[AsyncSession]) -> set[str]:
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
        return open_token_key(keys, await referenced_master_key_ids(sessions))
    path = settings.master_key_file
    next_path = path.with_name(master_key.NEXT_FILE_NAME)
    referenced = await referenced_master_key_ids(sessions)
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


def open_token_key(keys: master_key_pkcs11.TokenKeys, referenced: set[str]) -> MasterKey:
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
