"""Whether the database answers, as this process sees it: one shared flag, set by what calls meet
and kept true by a probe.

Once any call meets an outage (broker.db.outages), the flag goes down: calls that need the database
are then refused at once (UNAVAILABLE, DATABASE_UNAVAILABLE) instead of each waiting out its own
timeout behind the others, and the process is not ready (broker.core.readiness: the health service
turns NOT_SERVING). A probe (`SELECT 1`, bounded by the database timeout) runs every `down_interval`
while it is down and sets it up again on its first answer, so calls work again within about a second
of the database; while up, the probe runs every `up_interval`, so an idle process notices an outage
too.
"""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskStatus
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.core.readiness import Readiness
from broker.db.outages import DatabaseUnavailable, is_lock_timeout, is_outage

log = logging.getLogger(__name__)

CONDITION = "database"
"""Its name among the process's readiness conditions (broker.core.readiness)."""


class DatabaseAvailability:
    """The flag and its probe (`run`, a background task)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        timeout: float,
        up_interval: float = 5.0,
        down_interval: float = 0.5,
        readiness: Readiness | None = None,
    ) -> None:
        self._engine = engine
        self._timeout = timeout
        self._up_interval = up_interval
        self._down_interval = down_interval
        self._wake = anyio.Event()
        self._readiness = readiness
        self.available = True

    def check(self) -> None:
        """Raises DatabaseUnavailable while the database is known to be down."""
        if not self.available:
            raise DatabaseUnavailable

    def report(self, exc: BaseException) -> None:
        """Called with a failure a call met: an outage takes the flag down (the probe brings it
        back). Anything else is not this module's business."""
        if is_outage(exc) and not is_lock_timeout(exc):
            self._set(False)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Probes until cancelled (see the module docstring)."""
        task_status.started()
        while True:
            with anyio.move_on_after(self._up_interval if self.available else self._down_interval):
                await self._wake.wait()
            self._wake = anyio.Event()
            self._set(await self.probe())

    async def probe(self) -> bool:
        """Whether the database answers a trivial query within the timeout now."""
        try:
            with anyio.fail_after(self._timeout):
                async with self._engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
        except Exception as exc:
            if isinstance(exc, TimeoutError) or is_outage(exc):
                return False
            raise
        return True

    def _set(self, available: bool) -> None:
        if available == self.available:
            return
        self.available = available
        if available:
            log.info("the database answers again")
        else:
            log.warning("the database is unavailable: refusing calls that need it until it answers")
            self._wake.set()  # probe soon, at the down interval
        if self._readiness is not None:
            self._readiness.set(CONDITION, available)
