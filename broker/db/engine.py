"""Async engines for the two supported databases, with the settings each one needs."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession

from broker.core.errors import ConfigurationError

OFFLINE_TIMEOUT = 30.0
"""How long offline work (migrations, tools) waits for a lock or a connection, in seconds."""


def create_engine(url: str, *, timeout: float | None = None) -> AsyncEngine:
    """An engine for `sqlite+aiosqlite:///...` or `postgresql+asyncpg://...`.

    `timeout` (seconds) bounds what a serving process waits for PostgreSQL: a connection
    attempt, a pooled connection, a statement. (SQLite, a file on this machine, cannot be
    unreachable; its busy timeout stays OFFLINE_TIMEOUT.)
    Past it the call fails (broker.db.outages: UNAVAILABLE, DATABASE_UNAVAILABLE) instead of
    hanging: a database that is stopped or that stopped answering is refused within it. On
    PostgreSQL a checkout may ping a pooled connection and then open a new one, so the ping (a
    statement) and the connection attempt get half of it each. None: offline work, which waits
    (OFFLINE_TIMEOUT for connections and locks, statements unbounded).

    SQLite: WAL (readers never wait for the writer), synchronous=FULL (a commit, and so an audit
    record, survives power loss), secure_delete (deleted key material is overwritten in the file),
    foreign keys on, and every transaction BEGIN IMMEDIATE so two writers queue on the busy timeout
    instead of failing on lock upgrade.
    """
    parsed = make_url(url)
    wait = OFFLINE_TIMEOUT if timeout is None else timeout
    if parsed.drivername == "sqlite+aiosqlite":
        # The busy timeout stays long: writers queue on SQLite's one lock, and a long writer (a
        # re-wrap job's batch, a customer-key switch) is contention, not an outage.
        engine = create_async_engine(url, connect_args={"timeout": OFFLINE_TIMEOUT})
        _configure_sqlite(engine)
        return engine
    if parsed.drivername == "postgresql+asyncpg":
        return create_async_engine(
            url,
            pool_size=10,
            max_overflow=10,
            # A connection that died with the server is found at checkout and replaced, so calls
            # work again as soon as the database does.
            pool_pre_ping=True,
            pool_timeout=wait,
            connect_args={
                "timeout": wait if timeout is None else timeout / 2,
                "command_timeout": None if timeout is None else timeout / 2,
            },
        )
    raise ConfigurationError(
        f"unsupported database URL scheme {parsed.drivername!r}: "
        "use sqlite+aiosqlite:///PATH or postgresql+asyncpg://..."
    )


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to the "begin" hook below (pysqlite's own BEGIN is DEFERRED).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=FULL",
            "secure_delete=ON",
            "foreign_keys=ON",
        ):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay readable after commit (the caller owns the transaction)."""
    return async_sessionmaker(engine, expire_on_commit=False)


def is_postgresql(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "postgresql"
