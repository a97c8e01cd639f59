"""The job runner: claims one job at a time, keeps its lease alive while the handler runs, and
settles the outcome. On shutdown it stops claiming and gives the current job back at its next
step (handlers are resumable), so the next runner picks it up at once.

A database outage (broker.db.outages) is waited out, never fatal: claiming pauses, a lease renewal
that fails is tried again at the next tick, a job whose step met the outage is settled as given
back (not as a failed attempt) once the database answers again. If it does not answer before the
lease runs out, the job returns to the queue by itself and is resumed from its cursor: handlers
are idempotent, so it runs to the same end.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

import anyio
import grpc
from anyio.abc import TaskStatus

from broker.core.errors import KeybrokerError
from broker.db.outages import is_outage
from workers.job_handlers import HANDLERS, JobContext
from workers.jobs import JobQueue
from workers.tables import JobRow

log = logging.getLogger(__name__)

JOB_DEADLINE = timedelta(hours=6)
SETTLE_RETRY_FIRST = 0.2
SETTLE_RETRY_MAX = 2.0


class LeaseLost(Exception):
    """Another runner holds the job now; this one stops working on it."""


class JobReleased(Exception):
    """Shutting down: the job goes back to the queue, to resume from its cursor."""


async def run_jobs(
    queue: JobQueue,
    ctx: JobContext,
    *,
    lease: timedelta,
    poll: timedelta,
    stopping: anyio.Event,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Runs jobs until `stopping` is set."""
    task_status.started()
    outage = False
    while not stopping.is_set():
        try:
            job = await queue.claim()
        except Exception as exc:
            if not is_outage(exc):
                raise
            if not outage:
                log.warning("job runner: the database is unavailable; claiming paused")
            outage = True
            job = None
        else:
            if outage:
                log.info("job runner: the database answers again")
            outage = False
        if job is None:
            with anyio.move_on_after(poll.total_seconds()):
                await stopping.wait()
            continue
        await run_one(queue, ctx, job, lease, stopping)


async def run_one(
    queue: JobQueue, ctx: JobContext, job: JobRow, lease: timedelta, stopping: anyio.Event
) -> None:
    """Runs one claimed job to an outcome: succeeded, retry later, failed, or given back.

    Nothing here cancels a handler: a handler cancelled inside a database call can leave the
    driver's connection half-closed (with aiosqlite, a close task that never finishes, which
    keeps the process from exiting). Shutdown and a lost lease are seen at the handler's next
    progress report, between steps, where stopping is clean.
    """
    lease_lost = False

    async def progress(cursor: str, done: int, total: int) -> None:
        if lease_lost or not await queue.progress(job.id, cursor, done, total):
            raise LeaseLost
        if stopping.is_set():
            raise JobReleased

    outcome: BaseException | None = None
    finished = False
    gave_back = False  # a step met a database outage: the job goes back, no attempt counted
    async with anyio.create_task_group() as tg:

        async def keep_lease() -> None:
            nonlocal lease_lost
            while True:
                await anyio.sleep(lease.total_seconds() / 3)
                try:
                    with anyio.CancelScope(shield=True):  # see the docstring
                        renewed = await queue.renew(job.id)
                except Exception as exc:
                    if not is_outage(exc):
                        raise
                    continue  # tried again at the next tick, while the lease lasts
                if not renewed:
                    log.warning("lost the lease on job %s", job.id)
                    lease_lost = True
                    return

        tg.start_soon(keep_lease)
        try:
            with anyio.fail_after(JOB_DEADLINE.total_seconds()):
                await HANDLERS[job.kind](job, ctx, progress)
            finished = True
        except (LeaseLost, JobReleased) as exc:
            log.info("job %s: %s", job.id, exc.__doc__)
        except Exception as exc:  # the runner settles every failure, and logs it in full
            if _transient(exc):
                log.warning("job %s: %s; giving it back", job.id, _describe(exc))
                gave_back = True
            else:
                log.exception("job %s (%s) attempt %d failed", job.id, job.kind, job.attempts)
                outcome = exc
        tg.cancel_scope.cancel()

    async def settle() -> None:
        if finished:
            await queue.succeed(job.id)
        elif outcome is not None:
            await queue.fail(job.id, job.attempts, type(outcome).__name__)
        elif (stopping.is_set() or gave_back) and not lease_lost:
            await queue.release(job.id, count_attempt=not gave_back)

    with anyio.CancelScope(shield=True):
        await _settle_when_possible(settle, job.id, lease, stopping)


def _transient(exc: BaseException) -> bool:
    """A failure that says "not now" (the database, or the broker, is unavailable) rather than
    "not so": the job is given back without counting an attempt."""
    return is_outage(exc) or (
        isinstance(exc, KeybrokerError) and exc.code == grpc.StatusCode.UNAVAILABLE
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeybrokerError):
        return f"{exc.reason}: {exc.message}"
    return f"the database is unavailable ({type(exc).__name__})"


async def _settle_when_possible(
    settle: Callable[[], Awaitable[None]], job_id: str, lease: timedelta, stopping: anyio.Event
) -> None:
    """Runs `settle`, trying again through a database outage until the lease would have run out
    (then the job is back in the queue anyway). Settling is idempotent: it only changes a job
    this runner still holds."""
    delay = SETTLE_RETRY_FIRST
    with anyio.move_on_after(lease.total_seconds()):
        while True:
            try:
                await settle()
                return
            except Exception as exc:
                if not is_outage(exc):
                    raise
            if stopping.is_set():
                break  # shutting down: the lease returns the job to the queue
            await anyio.sleep(delay)
            delay = min(delay * 2, SETTLE_RETRY_MAX)
    log.warning("job %s: not settled (database unavailable); its lease will free it", job_id)
