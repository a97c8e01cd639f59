"""Durable jobs in SQL, claimed with leases.

A job row is claimed by one runner at a time: the claim sets a lease (owner, expiry) in one
statement (PostgreSQL: the candidate row is picked with FOR UPDATE SKIP LOCKED, so runners never
wait for each other; SQLite: a single writer, every transaction BEGIN IMMEDIATE). The runner
renews the lease while the job runs; a runner that dies stops renewing, the lease expires and
the next claimant runs the job again from its saved cursor. Handlers are therefore idempotent.
A failed attempt is retried with exponential backoff, up to MAX_ATTEMPTS.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from workers.tables import JobRow

REMOVE_BLOB = "remove-blob"
REWRAP = "rewrap"
REENCRYPT = "reencrypt"
MAX_ATTEMPTS = 10
MAX_BACKOFF = timedelta(minutes=5)


def add_job(
    session: AsyncSession, kind: str, resource_id: str, now: datetime, **payload: Any
) -> JobRow:
    """Adds a job to the caller's transaction (so it exists exactly when the change does)."""
    job = JobRow(
        id=os.urandom(12).hex(),
        kind=kind,
        resource_id=resource_id,
        payload=json.dumps(payload, sort_keys=True),
        state="pending",
        attempts=0,
        not_before=now,
        cursor="",
        done=0,
        total=0,
        create_time=now,
        update_time=now,
        error_message="",
    )
    session.add(job)
    return job


class JobQueue:
    """Claims, renews and settles jobs for one runner (`owner`)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        owner: str,
        lease: timedelta,
        now: Callable[[], datetime],
        *,
        skip_locked: bool,
    ) -> None:
        """`skip_locked`: PostgreSQL, where claims pick rows with FOR UPDATE SKIP LOCKED."""
        self._sessions = sessions
        self.owner = owner
        self._lease = lease
        self._now = now
        self._skip_locked = skip_locked

    async def claim(self) -> JobRow | None:
        """The oldest runnable job, now leased to this runner; None when there is none."""
        now = self._now()
        candidate = (
            select(JobRow.id)
            .where(
                JobRow.state.in_(("pending", "running")),
                JobRow.not_before <= now,
                (JobRow.lease_expires.is_(None)) | (JobRow.lease_expires < now),
            )
            .order_by(JobRow.create_time)
            .limit(1)
        )
        if self._skip_locked:
            candidate = candidate.with_for_update(skip_locked=True)
        async with self._sessions.begin() as session:
            claimed = await session.scalars(
                update(JobRow)
                .where(JobRow.id == candidate.scalar_subquery())
                .values(
                    state="running",
                    lease_owner=self.owner,
                    lease_expires=now + self._lease,
                    attempts=JobRow.attempts + 1,
                    update_time=now,
                )
                .returning(JobRow),
                execution_options={"synchronize_session": False},
            )
            return claimed.one_or_none()

    async def _update_own(self, job_id: str, **values: Any) -> bool:
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.lease_owner == self.owner)
                .values(update_time=self._now(), **values)
                .execution_options(synchronize_session=False)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    async def renew(self, job_id: str) -> bool:
        """Extends the lease; False when it was lost (another runner took the job)."""
        return await self._update_own(job_id, lease_expires=self._now() + self._lease)

    async def progress(self, job_id: str, cursor: str, done: int, total: int) -> bool:
        return await self._update_own(job_id, cursor=cursor, done=done, total=total)

    async def succeed(self, job_id: str) -> None:
        await self._update_own(job_id, state="succeeded", lease_owner=None, lease_expires=None)

    async def release(self, job_id: str, *, count_attempt: bool = True) -> None:
        """Gives the job back unfinished (shutdown): the next claimant resumes it at once.
        Without `count_attempt` (it met an outage, which is not the job's doing) the attempt
        its claim counted is taken back, so outages never bring it nearer MAX_ATTEMPTS."""
        values: dict[str, Any] = {"state": "pending", "lease_owner": None, "lease_expires": None}
        if not count_attempt:
            values["attempts"] = JobRow.attempts - 1
        await self._update_own(job_id, **values)

    async def fail(self, job_id: str, attempts: int, error: str) -> None:
        """Schedules a retry with backoff, or gives up after MAX_ATTEMPTS."""
        if attempts >= MAX_ATTEMPTS:
            await self._update_own(
                job_id, state="failed", lease_owner=None, lease_expires=None, error_message=error
            )
            return
        backoff = min(MAX_BACKOFF, timedelta(seconds=2**attempts))
        await self._update_own(
            job_id,
            state="pending",
            lease_owner=None,
            lease_expires=None,
            not_before=self._now() + backoff,
            error_message=error,
        )

    async def get(self, job_id: str) -> JobRow | None:
        async with self._sessions() as session:
            return await session.get(JobRow, job_id)
