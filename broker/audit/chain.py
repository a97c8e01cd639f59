"""The tamper-evident audit chain: record MACs, the audit keys, and the chain-head checkpoints.

Record MAC, format version 1. Each chained audit record carries

    chain_mac = HMAC-SHA256(audit key, message)
    message   = associated_data.encode(
                    b"keybroker/audit-record/v1", audit_key_id, writer, u64(chain_seq),
                    previous chain_mac (32 zero bytes for chain_seq 1),
                    i64(time as microseconds since the Unix epoch, UTC), request_id, caller,
                    opt(on_behalf_of), operation, opt(resource), i64(item_count),
                    i64(failed_count), key_ids, outcome, opt(reason))

with every text field UTF-8, u64/i64 big-endian 8-byte integers, and opt(x) = b"\\x00" for
NULL, b"\\x01" || x otherwise. Every field is length-prefixed (broker.keys.associated_data), so no
two records encode alike; the database `id` is not covered (it is a storage position, and the
order that matters is chain_seq). A new encoding needs a new domain string and format version.

Chains. One chain per writer: `writer` is `host:pid:random` (broker.audit.log.writer_id) plus a
suffix naming the path that wrote it, ":g" for the group-committed records and ":s" for the
records that state changes write inside their own transaction. Two chains per process because
the two paths commit independently: a group never waits for a state change, and a state change
that rolls back takes its record with it, which would leave a hole in a shared chain. The ":s"
chain's head moves only once its transaction has committed (broker.audit.AuditLog.record_in).
A chain starts at chain_seq 1 when its process starts; nothing ever continues another's chain.

Audit keys. A random 32-byte HMAC key, sealed under the master key (broker.keys.key_wrapping, label
b"audit-key", context = the key id) in the `audit_keys` table. Sealing, not derivation, because
the master key may be a non-extractable PKCS#11 key whose bytes nobody can feed to HKDF, while
both kinds of master key can seal; and because `keybroker master-key rotate` re-seals the audit
keys with the root keys (in the same transaction), so records MACed before a rotation still
verify after it. A broker uses the newest audit key sealed by its master key and creates one
when there is none; each record names its key, so several keys may coexist.

Checkpoints. The chain heads of one process are written to
`{data_dir}/audit-checkpoints/{writer}.json` (mode 0600, temp file + fsync + rename) about once a
second while they move, and on shutdown, when they are also logged at INFO. A head there that the
database does not reach shows a truncated tail. The file format (version 1, JSON):

    {"format": 1, "time": ISO 8601,
     "chains": [{"writer": str, "seq": int, "mac": hex, "audit_key_id": str}, ...]}
"""

from __future__ import annotations

import functools
import hmac
import json
import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.core.errors import ConfigurationError
from broker.db.tables import AuditKeyRow
from broker.keys import associated_data, key_wrapping
from broker.keys.master_key import MasterKey

FORMAT_V1 = 1
DOMAIN_V1 = b"keybroker/audit-record/v1"
GENESIS = bytes(32)
"""The `previous chain_mac` of a chain's first record."""
MAC_SIZE = 32
KEY_SIZE = 32
GROUP_SUFFIX = ":g"
STATE_SUFFIX = ":s"
CHECKPOINT_DIR = "audit-checkpoints"
_SEAL_LABEL = b"audit-key"
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NULL = b"\x00"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")

CONTENT_COLUMNS = (
    "time",
    "writer",
    "request_id",
    "caller",
    "on_behalf_of",
    "operation",
    "resource",
    "item_count",
    "failed_count",
    "key_ids",
    "outcome",
    "reason",
)
"""The columns a MAC covers besides the chain fields, in message order (audit_sinks.COLUMNS)."""


_LEN = struct.Struct(">I").pack
_INT_PREFIX = _LEN(8)
_ONE_MICROSECOND = timedelta(microseconds=1)


def _text(value: str) -> bytes:
    data = value.encode()
    return _LEN(len(data)) + data


def _opt(value: str | None) -> bytes:
    if value is None:
        return _LEN(1) + _NULL
    data = value.encode()
    return _LEN(len(data) + 1) + b"\x01" + data


@functools.lru_cache(maxsize=64)
def _head(key_id: str) -> bytes:
    return associated_data.encode(DOMAIN_V1, key_id.encode())


def message(key_id: str, seq: int, previous: bytes, content: Sequence[Any]) -> bytes:
    """The version-1 MAC message (see the module docstring); `content` in CONTENT_COLUMNS order.

    Spelled out rather than built with associated_data.encode: it runs once per audit record on
    the hot path, and this is twice as fast; the frozen vectors pin that both agree."""
    (time, writer, request_id, caller, on_behalf_of, operation, resource, items, failed,
     key_ids, outcome, reason) = content  # fmt: skip
    return b"".join(
        (
            _head(key_id),
            _text(writer),
            _INT_PREFIX + _U64.pack(seq),
            _LEN(len(previous)) + previous,
            _INT_PREFIX + _I64.pack((time - _EPOCH) // _ONE_MICROSECOND),
            _text(request_id),
            _text(caller),
            _opt(on_behalf_of),
            _text(operation),
            _opt(resource),
            _INT_PREFIX + _I64.pack(items),
            _INT_PREFIX + _I64.pack(failed),
            _text(key_ids),
            _text(outcome),
            _opt(reason),
        )
    )


def reference_message(key_id: str, seq: int, previous: bytes, content: Sequence[Any]) -> bytes:
    """`message` built field by field with associated_data.encode (the definition; for tests)."""
    (time, writer, request_id, caller, on_behalf_of, operation, resource, items, failed,
     key_ids, outcome, reason) = content  # fmt: skip

    def opt(value: str | None) -> bytes:
        return _NULL if value is None else b"\x01" + value.encode()

    micros = (time.astimezone(UTC) - _EPOCH) // _ONE_MICROSECOND
    return associated_data.encode(
        DOMAIN_V1,
        key_id.encode(),
        writer.encode(),
        _U64.pack(seq),
        previous,
        _I64.pack(micros),
        request_id.encode(),
        caller.encode(),
        opt(on_behalf_of),
        operation.encode(),
        opt(resource),
        _I64.pack(items),
        _I64.pack(failed),
        key_ids.encode(),
        outcome.encode(),
        opt(reason),
    )


@dataclass(frozen=True)
class AuditKey:
    """One audit HMAC key and its id (`auditKeys/{hex}`)."""

    key_id: str
    secret: bytes = field(repr=False)

    def mac(self, seq: int, previous: bytes, content: Sequence[Any]) -> bytes:
        """The chain_mac of a record at `seq` after `previous`."""
        return hmac.digest(self.secret, message(self.key_id, seq, previous, content), "sha256")


@dataclass(frozen=True, slots=True)
class Head:
    """Where a chain stands: its writer, last chain_seq (0: empty) and that record's MAC."""

    writer: str
    seq: int
    mac: bytes
    audit_key_id: str


# -- audit keys in SQL ------------------------------------------------------------------------


def _context(key_id: str) -> tuple[bytes, ...]:
    return (key_id.encode(),)


async def open_audit_key(
    sessions: async_sessionmaker[AsyncSession], master: MasterKey, now: datetime
) -> AuditKey:
    """The newest audit key sealed by `master`, created (and committed) when there is none."""
    async with sessions.begin() as session:
        row = (
            await session.scalars(
                select(AuditKeyRow)
                .where(AuditKeyRow.master_key_id == master.key_id)
                .order_by(AuditKeyRow.create_time.desc(), AuditKeyRow.id)
                .limit(1)
            )
        ).first()
        if row is not None:
            return _unwrap_audit_key(master, row)
        key = AuditKey(f"auditKeys/{os.urandom(8).hex()}", os.urandom(KEY_SIZE))
        sealed = key_wrapping.wrap(master.aead, key.secret, _SEAL_LABEL, _context(key.key_id))
        session.add(
            AuditKeyRow(
                id=key.key_id, sealed_key=sealed, master_key_id=master.key_id, create_time=now
            )
        )
        return key


def _unwrap_audit_key(master: MasterKey, row: AuditKeyRow) -> AuditKey:
    try:
        secret = key_wrapping.unwrap(master.aead, row.sealed_key, _SEAL_LABEL, _context(row.id))
    except key_wrapping.UnwrapError:
        raise ConfigurationError(
            f"audit key {row.id} does not open under {master.key_id}: the database was tampered "
            "with, or this is not its master key"
        ) from None
    return AuditKey(row.id, secret)


async def load_audit_keys(session: AsyncSession, master: MasterKey) -> dict[str, AuditKey]:
    """Every audit key the database holds, by id (ConfigurationError if one does not open)."""
    rows = (await session.scalars(select(AuditKeyRow))).all()
    keys: dict[str, AuditKey] = {}
    for row in rows:
        if row.master_key_id != master.key_id:
            raise ConfigurationError(
                f"audit key {row.id} is sealed by {row.master_key_id}, not by {master.key_id}"
            )
        keys[row.id] = _unwrap_audit_key(master, row)
    return keys


async def rewrap_audit_keys(session: AsyncSession, old: MasterKey, new: MasterKey) -> int:
    """Re-seals every audit key sealed by `old` under `new` in the caller's transaction (master-key
    rotation); returns how many. The keys themselves do not change, so old records still verify."""
    rows = (
        await session.scalars(
            select(AuditKeyRow).where(AuditKeyRow.master_key_id == old.key_id).with_for_update()
        )
    ).all()
    for row in rows:
        key = _unwrap_audit_key(old, row)
        await session.execute(
            update(AuditKeyRow)
            .where(AuditKeyRow.id == row.id)
            .values(
                sealed_key=key_wrapping.wrap(new.aead, key.secret, _SEAL_LABEL, _context(row.id)),
                master_key_id=new.key_id,
            )
        )
    return len(rows)


# -- checkpoints --------------------------------------------------------------------------------


def checkpoint_path(data_dir: Path, process_writer: str) -> Path:
    """The checkpoint file of the process whose writer id (without suffix) is given."""
    return data_dir / CHECKPOINT_DIR / f"{_SAFE_NAME.sub('_', process_writer)}.json"


def write_checkpoint(path: Path, heads: Iterable[Head], now: datetime) -> None:
    """Atomically replaces the checkpoint file at `path` (mode 0600, fsynced; format above)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    body = {
        "format": FORMAT_V1,
        "time": now.isoformat(),
        "chains": [
            {"writer": h.writer, "seq": h.seq, "mac": h.mac.hex(), "audit_key_id": h.audit_key_id}
            for h in heads
        ],
    }
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(body, sort_keys=True).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CheckpointError(Exception):
    """A checkpoint file that does not parse; `path` names it."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path


def read_checkpoints(data_dir: Path) -> tuple[list[Head], list[CheckpointError]]:
    """Every head recorded under `data_dir`, and the files that could not be read."""
    heads: list[Head] = []
    errors: list[CheckpointError] = []
    directory = data_dir / CHECKPOINT_DIR
    if not directory.is_dir():
        return heads, errors
    for path in sorted(directory.glob("*.json")):
        try:
            heads.extend(_parse_checkpoint(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            errors.append(CheckpointError(path, type(exc).__name__))
    return heads, errors


def _parse_checkpoint(body: Any) -> list[Head]:
    if body.get("format") != FORMAT_V1:
        raise ValueError("unknown format")
    return [
        Head(
            str(chain["writer"]),
            int(chain["seq"]),
            bytes.fromhex(chain["mac"]),
            str(chain["audit_key_id"]),
        )
        for chain in body["chains"]
    ]
