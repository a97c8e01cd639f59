"""The job runner: claims one job at a time, keeps its lease alive while the handler runs, and
settles the outcome. On shutdown it stops claiming and gives the current job back at its next
step (handlers are resumable), so the next runner picks it up at once.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import anyio
from anyio.abc import TaskStatus

from workers.job_handlers import HANDLERS, JobContext
from workers.jobs import JobQueue
from workers.tables import JobRow

log = logging.getLogger(__name__)

JOB_DEADLINE = timedelta(hours=6)


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
    while not stopping.is_set():
        job = await queue.claim()
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
    async with anyio.create_task_group() as tg:

        async def keep_lease() -> None:
            nonlocal lease_lost
            while True:
                await anyio.sleep(lease.total_seconds() / 3)
                with anyio.CancelScope(shield=True):  # see the docstring
                    renewed = await queue.renew(job.id)
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
            log.exception("job %s (%s) attempt %d failed", job.id, job.kind, job.attempts)
            outcome = exc
        tg.cancel_scope.cancel()

    with anyio.CancelScope(shield=True):
        if finished:
            await queue.succeed(job.id)
        elif outcome is not None:
            await queue.fail(job.id, job.attempts, type(outcome).__name__)
        elif stopping.is_set() and not lease_lost:
            await queue.release(job.id)
