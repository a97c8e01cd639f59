"""The audit trail: one record per answered call and per state change.

Two ways in, one table (broker.db.tables.AuditRow):
- `record_in(session, event)`: a state change writes its record in its own transaction, so the
  record and the change commit or vanish together.
- `await AuditLog.record(event)`: everything else (data-key calls, reads, rejections) joins the
  current group, which a background task commits in one transaction; the call returns only once
  its group is durable, as a database waits for its log flush. Groups form by themselves: while one
  commits, the next fills. Under load a commit also waits, up to `commit_delay`, for the group to
  grow back to the size of the last one (PostgreSQL's commit_delay with commit_siblings): every
  commit has a fixed cost (a thread hop, BEGIN, COMMIT, an fsync: ~250 us of CPU on SQLite here),
  so small groups under load cost more CPU than the calls themselves. A lone caller never waits
  (its last group had no siblings). The pending group is bounded: callers wait for room
  (backpressure); nothing is dropped.

Once `use_key` has given it an audit key, every record is chained (broker.audit.chain): the group
path MACs each record as its group is committed (one HMAC per record, on the committing task, so
a group's records form a contiguous run of its chain), and the head moves only when the group is
durable; a failed group leaves the head where it was. State changes chain on a second chain of
their own (writer suffix ":s"): `record_in` takes the state lock, MACs the record after the
committed head, and the transaction's end releases the lock, moving the head only if it
committed. So at most one state-change transaction per process is between its record and its
commit; `record_in` first makes its transaction begin on the database (on SQLite that takes the
write lock, BEGIN IMMEDIATE) so the database's lock is always taken before the state lock, never
the other way round. Callers write their record last, or read only, after it. Without a key
(a process that does not hold the master key) records are written unchained.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
from anyio.abc import TaskStatus
from sqlalchemy import event as sa_event
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from broker.audit import chain
from broker.audit.chain import AuditKey, Head
from broker.audit.sinks import COLUMNS, AuditSink, AuditSinkError, AuditTuple, open_sink
from broker.core.audit_event import AuditEvent
from broker.core.errors import Unavailable
from broker.db.availability import DatabaseAvailability
from broker.db.outages import DatabaseUnavailable, is_outage
from broker.db.tables import AuditRow

log = logging.getLogger(__name__)


def writer_id() -> str:
    """Identifies this process as an audit writer (host, pid, and a random tag)."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{os.urandom(4).hex()}"


class AuditLog:
    """Group-committing audit writer; `run` is its background task (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_pending: int = 10_000,
        checkpoint_every: float = 1.0,
        commit_delay: float = 0.002,
        database_timeout: float | None = None,
        availability: DatabaseAvailability | None = None,
    ) -> None:
        self.engine = engine
        self._database_timeout = database_timeout
        self._availability = availability
        self._commit_delay = commit_delay
        # Size of the last committed group: the size a group under load waits to grow back to.
        self._last_group = 0
        self._url = engine.url
        self._max_pending = max_pending
        self.writer = writer_id()
        self._pending: list[AuditTuple] = []
        self._group: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._closing = False
        self.groups_committed = 0
        self.records_committed = 0
        # The chain (None: unchained). Writers get their suffix only when chained, so an
        # unchained record's writer never looks like a chain's.
        self._key: AuditKey | None = None
        self._group_writer = self._state_writer = self.writer
        self._group_head: Head | None = None
        self._state_head: Head | None = None
        self._state_lock = asyncio.Lock()
        # The state chain's head as of the record(s) of the transaction holding the lock.
        self._state_pending: Head | None = None
        self._checkpoint: Path | None = None
        self._checkpoint_every = checkpoint_every
        self._checkpointed: tuple[Head | None, Head | None] = (None, None)
        self._checkpoint_time = 0.0

    def use_key(self, key: AuditKey, checkpoint: Path | None) -> None:
        """Chains every record from now on under `key`; heads go to the `checkpoint` file."""
        self._key = key
        self._group_writer = self.writer + chain.GROUP_SUFFIX
        self._state_writer = self.writer + chain.STATE_SUFFIX
        self._group_head = Head(self._group_writer, 0, chain.GENESIS, key.key_id)
        self._state_head = Head(self._state_writer, 0, chain.GENESIS, key.key_id)
        self._checkpoint = checkpoint

    @property
    def heads(self) -> list[Head]:
        """The committed heads of this process's chains (empty when unchained)."""
        return [h for h in (self._group_head, self._state_head) if h is not None]

    async def record_in(self, session: AsyncSession, event: AuditEvent) -> None:
        """Adds the record to the caller's transaction (for state changes; see the module
        docstring for the chain's lock). Call it last in the transaction."""
        content = event.row(self._state_writer, datetime.now(UTC))
        key = self._key
        if key is None:
            row = dict(zip(COLUMNS, (*content, None, None, None), strict=True))
            await session.execute(insert(AuditRow), [row])
            return
        await session.connection()  # begin on the database first: see the module docstring
        sync = session.sync_session
        holder = sync.info.get(_HOLDER)
        holding = holder is not None and holder[0] is self
        if not holding:
            await self._state_lock.acquire()
            try:
                self._watch(sync)
            except BaseException:
                self._state_lock.release()
                raise
        before = self._state_pending
        after = before or self._state_head
        assert after is not None
        seq = after.seq + 1
        mac = key.mac(seq, after.mac, content)
        self._state_pending = Head(self._state_writer, seq, mac, key.key_id)
        row = dict(zip(COLUMNS, (*content, seq, mac, key.key_id), strict=True))
        try:
            await session.execute(insert(AuditRow), [row])
        except BaseException:
            self._state_pending = before
            raise

    def _watch(self, sync: Session) -> None:
        """Moves the state head when `sync`'s transaction commits; releases the lock at its end.

        The listeners stay on the session (SQLAlchemy cannot remove them while it dispatches);
        they act only while `sync.info` says this log's lock is held for that transaction."""
        sync.info[_HOLDER] = (self, sync.get_transaction())
        listening: set[int] = sync.info.setdefault(_LISTENING, set())
        if id(self) in listening:
            return
        listening.add(id(self))

        def committed(session: Session) -> None:
            holder = session.info.get(_HOLDER)
            if holder is not None and holder[0] is self:
                self._state_head = self._state_pending

        def ended(session: Session, transaction: SessionTransaction) -> None:
            holder = session.info.get(_HOLDER)
            # A savepoint's end is not the end: the record waits for the outer transaction.
            if holder is None or holder[0] is not self or holder[1] is not transaction:
                return
            del session.info[_HOLDER]
            self._state_pending = None
            self._state_lock.release()

        sa_event.listen(sync, "after_commit", committed)
        sa_event.listen(sync, "after_transaction_end", ended)

    async def record(self, event: AuditEvent) -> None:
        """Queues the record and returns once it is committed (Unavailable if it cannot be)."""
        if self._closing:
            raise Unavailable("SHUTTING_DOWN", "the broker is shutting down")
        while len(self._pending) >= self._max_pending:
            self._room.clear()
            await self._room.wait()
        self._pending.append(event.row(self._group_writer, datetime.now(UTC)))
        if self._group is None:
            self._group = asyncio.get_running_loop().create_future()
        group = self._group
        self._wake.set()
        # shield: the group is shared; one cancelled caller must not cancel it for the others.
        await asyncio.shield(group)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Commits groups until `close()` is called and everything pending is durable; writes
        the chain-head checkpoint while heads move, and on the way out (logged at INFO)."""
        sink = open_sink(self._url, self._database_timeout)
        task_status.started()
        try:
            while True:
                # Wakes at least every checkpoint interval, so state-chain heads get written too.
                with anyio.move_on_after(self._checkpoint_every):
                    await self._wake.wait()
                self._wake.clear()
                if self._pending:
                    await self._gather()
                    await self._commit_group(sink)
                elif self._closing:
                    return
                await self._maybe_checkpoint()
        finally:
            with anyio.CancelScope(shield=True):
                await sink.close()
                self.checkpoint(final=True)

    async def _gather(self) -> None:
        """Under load, waits up to commit_delay for the group to reach the last one's size (see
        the module docstring); returns at once for a lone caller or when closing."""
        target = min(self._last_group, self._max_pending)
        if self._commit_delay <= 0 or target < 2 or len(self._pending) >= target:
            return
        with anyio.move_on_after(self._commit_delay):
            while len(self._pending) < target and not self._closing:
                self._wake.clear()
                await self._wake.wait()

    def _chain(self, rows: list[AuditTuple]) -> tuple[list[AuditTuple], Head | None]:
        """The rows with their chain columns, and the group head once they are durable."""
        key, head = self._key, self._group_head
        if key is None or head is None:
            return [(*r, None, None, None) for r in rows], None
        seq, mac, key_id = head.seq, head.mac, key.key_id
        out: list[AuditTuple] = []
        for r in rows:
            seq += 1
            mac = key.mac(seq, mac, r)
            out.append((*r, seq, mac, key_id))
        return out, Head(head.writer, seq, mac, key_id)

    async def _commit_group(self, sink: AuditSink) -> None:
        rows, group = self._pending, self._group
        self._pending, self._group = [], None
        self._room.set()
        assert group is not None
        if self._availability is not None and not self._availability.available:
            # Known down: the group fails at once rather than wait out a connection attempt.
            group.set_exception(DatabaseUnavailable())
            group.exception()
            return
        chained, head = self._chain(rows)
        try:
            await sink.write(chained)
        except AuditSinkError as exc:
            if self._availability is not None:
                self._availability.report(exc)
            if is_outage(exc):
                log.warning(
                    "audit group commit failed (%d records): database unavailable", len(rows)
                )
            else:
                log.exception("audit group commit failed (%d records); their calls fail", len(rows))
            group.set_exception(Unavailable("AUDIT_UNAVAILABLE", "the audit trail is unavailable"))
            group.exception()  # retrieved: callers that were cancelled meanwhile do not care
        else:
            if head is not None:
                self._group_head = head
            self.groups_committed += 1
            self.records_committed += len(rows)
            self._last_group = len(rows)
            group.set_result(None)

    async def _maybe_checkpoint(self) -> None:
        heads = (self._group_head, self._state_head)
        if self._checkpoint is None or heads == self._checkpointed:
            return
        if time.monotonic() - self._checkpoint_time < self._checkpoint_every:
            return
        # A thread: an fsync must not stall the loop that serves calls.
        await anyio.to_thread.run_sync(self._write_checkpoint, heads)

    def _write_checkpoint(self, heads: tuple[Head | None, Head | None]) -> None:
        assert self._checkpoint is not None
        try:
            chain.write_checkpoint(
                self._checkpoint, [h for h in heads if h is not None], datetime.now(UTC)
            )
        except OSError as exc:
            log.warning("could not write the audit checkpoint %s: %s", self._checkpoint, exc)
            return
        self._checkpointed = heads
        self._checkpoint_time = time.monotonic()

    def checkpoint(self, *, final: bool = False) -> None:
        """Writes the chain heads to the checkpoint file now (`final`: and logs them at INFO)."""
        if self._checkpoint is None:
            return
        heads = (self._group_head, self._state_head)
        if heads != self._checkpointed:
            self._write_checkpoint(heads)
        if final:
            for h in self.heads:
                log.info(
                    "audit chain head: writer=%s seq=%d mac=%s key=%s",
                    h.writer,
                    h.seq,
                    h.mac.hex(),
                    h.audit_key_id,
                )

    def close(self) -> None:
        """Refuses new records; `run` returns after committing what is pending."""
        self._closing = True
        self._wake.set()


_HOLDER = "keybroker.audit.state_lock_holder"
"""Session.info key: (AuditLog, root transaction) while that transaction holds its state lock."""
_LISTENING = "keybroker.audit.listening"
"""Session.info key: ids of the AuditLogs whose listeners this session carries."""
