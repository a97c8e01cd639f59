"""`keybroker audit verify`: walks every audit chain and reports what does not add up.

The chains and their MACs are described in broker.audit.chain. Per writer the records are read in
chain order (chain_seq, then id) and each is checked against its predecessor:

- a MAC that does not match the record's content and its predecessor's MAC: the record was
  edited (or forged: nobody without the audit key can make a MAC that matches);
- a gap in chain_seq (including a chain that does not start at 1): records were deleted;
- a chain_seq seen twice: a record was inserted (a copy, or a forgery) or renumbered;
- ids that run backwards in chain order: records were reordered (moved to other positions);
- a record naming an audit key the database does not hold;
- a checkpoint (audit_chain's file in the data directory) whose head the chain does not reach,
  or reaches with another MAC: the tail was truncated (or replaced);
- an unchained record (no chain columns) after the first chained one: inserted, or written by a
  process without the audit key. Unchained records before every chained one were written before
  the chain existed (migration 0004) and are only counted: nothing can vouch for them.

Records are read in pages of `_BATCH` rows per statement (keyset pagination), so memory stays
flat however long the trail is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TextIO, cast

from sqlalchemy import Row, Table, func, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.audit import chain
from broker.audit.chain import GENESIS, AuditKey, CheckpointError, Head
from broker.core import data_dir_lock
from broker.core.errors import ConfigurationError
from broker.core.settings import Settings
from broker.db import schema
from broker.db.engine import create_engine, session_factory
from broker.db.tables import AuditRow
from broker.keys.master_key_setup import open_master_key

_BATCH = 1000
_AUDIT = cast(Table, AuditRow.__table__)
_CONTENT = [_AUDIT.c[name] for name in chain.CONTENT_COLUMNS]


@dataclass(frozen=True)
class Finding:
    """One thing wrong with the trail: a kind (edited, deleted, inserted, reordered, truncated,
    unknown-key, unchained, checkpoint) and a sentence for the operator."""

    kind: str
    detail: str


@dataclass
class Report:
    """What `verify` found."""

    records: int = 0
    chains: int = 0
    pre_chain: int = 0
    checkpoints: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        verdict = "OK" if self.ok else f"{len(self.findings)} finding(s)"
        return (
            f"audit verify: {self.records} chained records in {self.chains} chains, "
            f"{self.pre_chain} unchained records from before the audit chain, "
            f"{self.checkpoints} checkpointed heads: {verdict}"
        )


@dataclass
class _Walk:
    writer: str
    seq: int = 0
    mac: bytes = GENESIS
    last_id: int = 0


async def verify(
    engine: AsyncEngine,
    keys: dict[str, AuditKey],
    heads: list[Head],
    checkpoint_errors: list[CheckpointError] | None = None,
) -> Report:
    """Checks every chain in the database against `keys` and the checkpointed `heads`."""
    report = Report(checkpoints=len(heads))
    for error in checkpoint_errors or ():
        report.findings.append(Finding("checkpoint", f"unreadable checkpoint {error}"))
    expected = {h.writer: h for h in heads}
    walk: _Walk | None = None
    async for row in _chained_rows(engine):
        if walk is None or row.writer != walk.writer:
            if walk is not None:
                _end_chain(walk, expected.pop(walk.writer, None), report)
            walk = _Walk(row.writer)
            report.chains += 1
        report.records += 1
        _check(walk, row, keys, report)
    if walk is not None:
        _end_chain(walk, expected.pop(walk.writer, None), report)
    for head in expected.values():
        if head.seq > 0:
            report.findings.append(
                Finding(
                    "truncated",
                    f"chain {head.writer}: the checkpoint is at seq {head.seq}, but the database "
                    "holds none of its records (deleted)",
                )
            )
    await _unchained(engine, report)
    return report


def _check(walk: _Walk, row: Row[Any], keys: dict[str, AuditKey], report: Report) -> None:
    where = f"record id {row.id} (chain {walk.writer}, seq {row.chain_seq})"
    if row.chain_seq == walk.seq:
        report.findings.append(
            Finding("inserted", f"{where}: a second record at this chain position")
        )
        return  # the first one stays the chain's: later records link to it
    if row.chain_seq > walk.seq + 1:
        missing = f"{walk.seq + 1}" + (
            f"..{row.chain_seq - 1}" if row.chain_seq > walk.seq + 2 else ""
        )
        report.findings.append(
            Finding(
                "deleted", f"chain {walk.writer}: records seq {missing} are missing before {where}"
            )
        )
        # Its predecessor is gone, so its MAC cannot be checked; the chain goes on from it.
        walk.seq, walk.mac, walk.last_id = row.chain_seq, row.chain_mac, row.id
        return
    if row.id < walk.last_id:
        report.findings.append(
            Finding("reordered", f"{where}: stored before its predecessor (id {walk.last_id})")
        )
    key = keys.get(row.audit_key_id)
    if key is None:
        report.findings.append(
            Finding("unknown-key", f"{where}: audit key {row.audit_key_id} is not in the database")
        )
    else:
        content = tuple(row._mapping[c] for c in _CONTENT)
        if key.mac(row.chain_seq, walk.mac, content) != row.chain_mac:
            report.findings.append(
                Finding("edited", f"{where}: the MAC does not match (edited or forged)")
            )
    walk.seq, walk.mac, walk.last_id = row.chain_seq, row.chain_mac, max(row.id, walk.last_id)


def _end_chain(walk: _Walk, head: Head | None, report: Report) -> None:
    if head is None:
        return
    if head.seq > walk.seq:
        report.findings.append(
            Finding(
                "truncated",
                f"chain {walk.writer}: ends at seq {walk.seq}, but the checkpoint is at seq "
                f"{head.seq}: records seq {walk.seq + 1}..{head.seq} were deleted",
            )
        )
    elif head.seq == walk.seq and head.mac != walk.mac:
        report.findings.append(
            Finding(
                "truncated",
                f"chain {walk.writer}: the record at seq {head.seq} is not the one checkpointed "
                "(the tail was replaced)",
            )
        )


async def _chained_rows(engine: AsyncEngine) -> AsyncIterator[Row[Any]]:
    c = _AUDIT.c
    columns = [c.id, c.chain_seq, c.chain_mac, c.audit_key_id, *_CONTENT]
    chained = (c.chain_seq.is_not(None), c.chain_mac.is_not(None), c.audit_key_id.is_not(None))
    position: tuple[str, int, int] | None = None
    async with engine.connect() as conn:
        while True:
            query = select(*columns).where(*chained)
            if position is not None:
                query = query.where(tuple_(c.writer, c.chain_seq, c.id) > tuple_(*position))
            query = query.order_by(c.writer, c.chain_seq, c.id).limit(_BATCH)
            rows = (await conn.execute(query)).all()
            for row in rows:
                yield row
            if len(rows) < _BATCH:
                return
            last = rows[-1]
            position = (last.writer, last.chain_seq, last.id)


async def _unchained(engine: AsyncEngine, report: Report) -> None:
    c = _AUDIT.c
    unchained = or_(c.chain_seq.is_(None), c.chain_mac.is_(None), c.audit_key_id.is_(None))
    async with engine.connect() as conn:
        first_chained = await conn.scalar(select(func.min(c.id)).where(~unchained))
        if first_chained is None:
            report.pre_chain = await conn.scalar(select(func.count()).where(unchained)) or 0
            return
        report.pre_chain = (
            await conn.scalar(select(func.count()).where(unchained, c.id < first_chained)) or 0
        )
        late = await conn.execute(
            select(c.id, c.writer).where(unchained, c.id > first_chained).order_by(c.id)
        )
        for record_id, writer in late:
            report.findings.append(
                Finding(
                    "unchained",
                    f"record id {record_id} (writer {writer}) carries no chain among chained "
                    "records (inserted, or written without the audit key)",
                )
            )


async def run(settings: Settings, out: TextIO) -> int:
    """`keybroker audit verify`: opens the database and master key as `master-key rotate` does
    (sharing the data-directory lock with running brokers: it only reads), prints each finding
    and the summary to `out`, and returns the exit status (1 on any finding)."""
    if not settings.data_dir.is_dir():
        raise ConfigurationError(f"data directory {settings.data_dir} does not exist")
    if not settings.master_key_pkcs11_label and not settings.master_key_file.exists():
        # open_master_key would create one; a verifier must not.
        raise ConfigurationError(f"master key file {settings.master_key_file} does not exist")
    with data_dir_lock.locked(settings.data_dir, exclusive=False):
        engine = create_engine(settings.database)
        try:
            await schema.require_current(engine)
            sessions = session_factory(engine)
            master = await open_master_key(settings, sessions)
            async with sessions() as session:
                keys = await chain.load_audit_keys(session, master)
            heads, errors = chain.read_checkpoints(settings.data_dir)
            report = await verify(engine, keys, heads, errors)
        finally:
            await engine.dispose()
    for finding in report.findings:
        print(f"{finding.kind}: {finding.detail}", file=out)
    print(report.summary(), file=out)
    return 0 if report.ok else 1
