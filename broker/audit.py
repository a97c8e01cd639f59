"""The audit trail: one record per answered call and per state change.

Two ways in, one table (broker.db.models.AuditRow):
- `record_in(session, event)`: a state change writes its record in its own transaction, so the
  record and the change commit or vanish together.
- `await AuditLog.record(event)`: everything else (data-key calls, reads, rejections) joins the
  current group, which a background task commits with one executemany; the call returns only once
  its group is durable, as a database waits for its log flush. Groups form by themselves: while one
  commits, the next fills. The pending group is bounded: callers wait for room (backpressure);
  nothing is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
from anyio.abc import TaskStatus
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from broker.audit_sinks import COLUMNS, AuditSink, AuditSinkError, AuditTuple, open_sink
from broker.db.models import AuditRow
from broker.errors import Unavailable

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AuditEvent:
    """The facts of one call or change. Handlers fill in resource, key ids and counts as they go."""

    operation: str
    caller: str
    request_id: str
    on_behalf_of: str | None = None
    resource: str | None = None
    item_count: int = 1
    failed_count: int = 0
    key_ids: set[str] = field(default_factory=set)
    outcome: str = "OK"
    reason: str | None = None

    def row(self, writer: str, now: datetime) -> AuditTuple:
        """The record's values in audit_sinks.COLUMNS order."""
        return (
            now,
            writer,
            self.request_id,
            self.caller,
            self.on_behalf_of,
            self.operation,
            self.resource,
            self.item_count,
            self.failed_count,
            " ".join(sorted(self.key_ids)),
            self.outcome,
            self.reason,
        )


def writer_id() -> str:
    """Identifies this process as an audit writer (host, pid, and a random tag)."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{os.urandom(4).hex()}"


class AuditLog:
    """Group-committing audit writer; `run` is its background task (see the module docstring)."""

    def __init__(self, engine: AsyncEngine, *, max_pending: int = 10_000) -> None:
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

    async def record_in(self, session: AsyncSession, event: AuditEvent) -> None:
        """Adds the record to the caller's transaction (for state changes)."""
        row = dict(zip(COLUMNS, event.row(self.writer, datetime.now(UTC)), strict=True))
        await session.execute(insert(AuditRow), [row])

    async def record(self, event: AuditEvent) -> None:
        """Queues the record and returns once it is committed (Unavailable if it cannot be)."""
        if self._closing:
            raise Unavailable("SHUTTING_DOWN", "the broker is shutting down")
        while len(self._pending) >= self._max_pending:
            self._room.clear()
            await self._room.wait()
        self._pending.append(event.row(self.writer, datetime.now(UTC)))
        if self._group is None:
            self._group = asyncio.get_running_loop().create_future()
        group = self._group
        self._wake.set()
        # shield: the group is shared; one cancelled caller must not cancel it for the others.
        await asyncio.shield(group)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Commits groups until `close()` is called and everything pending is durable."""
        sink = open_sink(self._url)
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._pending:
                    await self._commit_group(sink)
                elif self._closing:
                    return
        finally:
            with anyio.CancelScope(shield=True):
                await sink.close()

    async def _commit_group(self, sink: AuditSink) -> None:
        rows, group = self._pending, self._group
        self._pending, self._group = [], None
        self._room.set()
        assert group is not None
        try:
            await sink.write(rows)
        except AuditSinkError:
            log.exception("audit group commit failed (%d records); their calls fail", len(rows))
            group.set_exception(Unavailable("AUDIT_UNAVAILABLE", "the audit trail is unavailable"))
            group.exception()  # retrieved: callers that were cancelled meanwhile do not care
        else:
            self.groups_committed += 1
            self.records_committed += len(rows)
            group.set_result(None)

    def close(self) -> None:
        """Refuses new records; `run` returns after committing what is pending."""
        self._closing = True
        self._wake.set()
