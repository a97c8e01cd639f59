"""Group commit of the audit trail: under load a commit waits (up to commit_delay) for its group
to grow back to the last group's size; a lone caller never waits for that."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from broker.audit.log import AuditLog
from broker.core.audit_event import AuditEvent
from broker.db.engine import create_engine


@pytest_asyncio.fixture
async def running_log(database_url: str) -> AsyncIterator[AuditLog]:
    engine = create_engine(database_url)
    log = AuditLog(engine, commit_delay=0.5)
    task = asyncio.create_task(log.run())
    try:
        yield log
    finally:
        log.close()
        await task
        await engine.dispose()


def event(i: int) -> AuditEvent:
    return AuditEvent("DecryptDataKey", "local:test", f"req-{i}")


@pytest.mark.asyncio
async def test_a_lone_caller_does_not_wait_for_siblings(running_log: AuditLog) -> None:
    started = time.monotonic()
    for i in range(5):
        await running_log.record(event(i))
    # Five commits one after another; a wait for siblings would cost 0.5 s each.
    assert time.monotonic() - started < 1.0
    assert running_log.groups_committed == 5


@pytest.mark.asyncio
async def test_under_load_a_group_waits_to_grow_back(running_log: AuditLog) -> None:
    await asyncio.gather(*(running_log.record(event(i)) for i in range(8)))
    assert (running_log.groups_committed, running_log.records_committed) == (1, 8)

    async def later(i: int) -> None:
        await asyncio.sleep(0.02 * i)
        await running_log.record(event(100 + i))

    # Eight calls arriving 20 ms apart: without the wait they would commit in several groups.
    await asyncio.gather(*(later(i) for i in range(8)))
    assert (running_log.groups_committed, running_log.records_committed) == (2, 16)
