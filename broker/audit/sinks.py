"""Where grouped audit records go: one durable bulk insert per group, on a connection of its own.

The group commit is on every data-key call's path, so it bypasses the ORM and SQLAlchemy's async
adaptation (which costs several thread hops per statement with aiosqlite): on SQLite a plain sqlite3
connection in one dedicated thread (BEGIN IMMEDIATE, executemany, COMMIT: one hop per group); on
PostgreSQL an asyncpg connection using COPY. Both write the same columns SQLAlchemy's AuditRow
maps, in the same representation.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any, Protocol

import asyncpg
from sqlalchemy.engine import URL

from broker.audit.chain import CONTENT_COLUMNS

COLUMNS = (*CONTENT_COLUMNS, "chain_seq", "chain_mac", "audit_key_id")
"""What a record stores: the content the MAC covers (broker.audit.chain), then its chain fields."""
AuditTuple = tuple[Any, ...]
"""One record: values in COLUMNS order, `time` an aware UTC datetime."""


class AuditSinkError(Exception):
    """A group could not be made durable."""


class AuditSink(Protocol):
    """Writes groups of audit records durably."""

    async def write(self, rows: Sequence[AuditTuple]) -> None:
        """Returns once every row is committed; raises AuditSinkError otherwise."""

    async def close(self) -> None: ...


# Rows per INSERT statement, largest first: a group goes in as a few multi-row statements
# (77 rows: 64 + 4 + 4 + 4 + 1) whose texts stay in sqlite3's statement cache. Not executemany:
# that steps once per row, releasing and retaking the GIL each time, and with the event loop busy
# on the other side of the GIL a 64-row group then took ~3x longer (29 ms against 10 ms, side by
# side, with a CPU-bound thread running).
_SQLITE_CHUNKS = (256, 64, 16, 4, 1)
_SQLITE_ROW = "({})".format(", ".join("?" * len(COLUMNS)))
_SQLITE_INSERTS = MappingProxyType(
    {
        n: "INSERT INTO audit_records ({}) VALUES {}".format(  # noqa: S608 -- constants only
            ", ".join(COLUMNS), ", ".join([_SQLITE_ROW] * n)
        )
        for n in _SQLITE_CHUNKS
    }
)


class _SqliteSink:
    # SQLAlchemy's SQLite DATETIME storage format, so the ORM reads these rows back unchanged.
    _TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"

    def __init__(self, path: str) -> None:
        self._path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-sqlite")
        self._conn: sqlite3.Connection | None = None

    def _write(self, rows: Sequence[AuditTuple]) -> None:
        if self._conn is None:
            self._conn = sqlite3.connect(self._path, timeout=30, isolation_level=None)
            self._conn.execute("PRAGMA synchronous=FULL")
        # Times are already UTC (AuditLog stamps them so); SQLite stores them naive.
        fmt = self._TIME_FORMAT
        params = [v for r in rows for v in (r[0].strftime(fmt), *r[1:])]
        width = len(COLUMNS)
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            start, left = 0, len(rows)
            for n in _SQLITE_CHUNKS:
                while left >= n:
                    conn.execute(_SQLITE_INSERTS[n], params[start * width : (start + n) * width])
                    start, left = start + n, left - n
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def write(self, rows: Sequence[AuditTuple]) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._write, rows)
        except sqlite3.Error as exc:
            raise AuditSinkError(str(exc)) from exc

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
        self._thread.shutdown()


class _PostgresSink:
    def __init__(self, dsn: str, timeout: float | None) -> None:
        self._dsn = dsn
        self._timeout = timeout
        self._conn: Any = None

    async def write(self, rows: Sequence[AuditTuple]) -> None:
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(self._dsn, timeout=self._timeout or 60)
            await self._conn.copy_records_to_table(
                "audit_records", records=rows, columns=COLUMNS, timeout=self._timeout
            )
        except Exception as exc:
            # Whatever the driver raises (a PostgresError, an OSError or TimeoutError, and also
            # its InternalClientError when a connection that died mid-COPY is used again) fails
            # this group and never the committer. The connection is in an unknown state: the
            # next group opens a new one.
            await self._discard()
            raise AuditSinkError(type(exc).__name__) from exc

    async def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


def open_sink(url: URL, timeout: float | None = None) -> AuditSink:
    """A sink for the database at `url` (the broker's engine URL); `timeout` bounds a PostgreSQL
    connection attempt and each write (broker.db.engine.create_engine)."""
    if url.get_backend_name() == "sqlite":
        assert url.database
        return _SqliteSink(url.database)
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    return _PostgresSink(dsn, timeout)
