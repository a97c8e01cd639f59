"""Telling a database outage from a bug: what the servers answer UNAVAILABLE (reason
DATABASE_UNAVAILABLE) and what background loops wait out, instead of INTERNAL and an exit.

An outage is anything that says the database cannot be reached or used right now: a connection
refused, lost or timed out (PostgreSQL stopped, restarting, or behind a network that stopped
forwarding), the pool out of connections for too long, or SQLite locked, full or read-only.
Statements that the database refuses for what they are (a constraint, a syntax error) are not
outages: they stay bugs, logged with their traceback.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator

import asyncpg
from sqlalchemy import exc as sa

from broker.core.errors import Unavailable

DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"

# Connection-level failures (asyncpg's own, before SQLAlchemy wraps them or where it does not).
_ASYNCPG_OUTAGES = (
    asyncpg.exceptions.PostgresConnectionError,  # class 08: connection exceptions
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up or shutting down
    asyncpg.exceptions.OperatorInterventionError,  # class 57: admin shutdown, crash
    asyncpg.exceptions.InterfaceError,  # the connection is closed or was lost
    asyncpg.exceptions.ConnectionDoesNotExistError,
)
_NETWORK_ERRNOS = frozenset({errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH})
# Where a bare TimeoutError or OSError must come from to count: the drivers, not the caller's
# own timeouts or files.
_DRIVERS = ("asyncpg", "sqlalchemy", "aiosqlite", "sqlite3")
# SQLite's "cannot do it now" errors (sqlite3.OperationalError messages).
_SQLITE_OUTAGES = (
    "database is locked",
    "database table is locked",
    "database or disk is full",
    "disk i/o error",
    "attempt to write a readonly database",
    "unable to open database file",
)


class DatabaseUnavailable(Unavailable):
    """The database cannot be reached or used now; the call changed nothing, retry later."""

    def __init__(self) -> None:
        super().__init__(DATABASE_UNAVAILABLE, "the database is unavailable; retry later")


def is_lock_timeout(exc: BaseException) -> bool:
    """Whether `exc` is SQLite's busy timeout running out: contention on its one write lock,
    answered UNAVAILABLE like an outage but not a sign that the database is down."""
    return any(
        isinstance(e, sqlite3.OperationalError) and "locked" in str(e).lower() for e in _chain(exc)
    )


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) means the database is unreachable or unusable now."""
    return any(_is_outage_itself(e) for e in _chain(exc))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps: SQLAlchemy's `orig`, and the `__cause__` that SQLAlchemy and the
    drivers raise `from`."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = current.orig if isinstance(current, sa.DBAPIError) else None
        current = orig if isinstance(orig, BaseException) else current.__cause__


def _is_outage_itself(exc: BaseException) -> bool:
    if isinstance(exc, DatabaseUnavailable):
        return True
    if isinstance(exc, sa.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sa.TimeoutError):  # no pooled connection came free in time
        return True
    if isinstance(exc, _ASYNCPG_OUTAGES):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return str(exc).lower().startswith(_SQLITE_OUTAGES)
    if isinstance(exc, TimeoutError | ConnectionError) or (
        isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS
    ):
        # asyncpg's connect and command timeouts, a refused or reset connection.
        return _raised_in_driver(exc)
    return False


def _raised_in_driver(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.split(".", 1)[0] in _DRIVERS:
            return True
        tb = tb.tb_next
    return False
