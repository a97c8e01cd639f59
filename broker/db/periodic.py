"""Background passes that run every interval and outlive what they meet: `every`.

A pass runs shielded: one cancelled inside a database call leaves the driver's connection
half-closed (with aiosqlite, a close task that never finishes, which hangs the event loop's
shutdown), so shutdown waits for the pass, as it does for in-flight calls. A pass that meets a
database outage (broker.db.outages) or one of the `tolerated` errors is logged and tried again at
the next tick; anything else is a bug and ends the process's task group.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

import anyio
from sqlalchemy.exc import SQLAlchemyError

from broker.core.errors import KeybrokerError
from broker.db.outages import is_outage

log = logging.getLogger(__name__)

TOLERATED: tuple[type[Exception], ...] = (SQLAlchemyError, OSError, KeybrokerError)
"""What a pass may fail with and be tried again: SQL, files, refusals."""


async def every(
    interval: timedelta,
    one_pass: Callable[[], Awaitable[object]],
    what: str,
    *,
    tolerated: tuple[type[Exception], ...] = TOLERATED,
) -> None:
    """Runs `one_pass` now and then every `interval` until cancelled (see the module docstring);
    `what` names it in the log."""
    while True:
        try:
            with anyio.CancelScope(shield=True):
                await one_pass()
        except Exception as exc:
            if is_outage(exc):
                log.warning("%s: the database is unavailable; trying again next tick", what)
            elif isinstance(exc, tolerated):
                log.exception("%s failed; trying again next tick", what)
            else:
                raise
        await anyio.sleep(interval.total_seconds())
