"""Work that must finish even when the RPC that started it is cancelled.

gRPC cancels a handler's task when its caller goes away or its deadline passes. A handler cancelled
inside a database call leaves the connection half-closed (with aiosqlite, a close task that never
finishes) and a state change whose audit record may be lost. So handlers that touch SQL run in a
task of their own: the RPC may stop waiting, the work and its audit record complete, and shutdown
waits for every such task after the server stops accepting calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class DetachedWork:
    """Tracks detached tasks; `wait_all` is part of the drain on shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Runs `work` in its own task and returns its result; cancelling the caller spares it."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the caller may be gone; the outcome is in the audit

    async def wait_all(self) -> None:
        """Returns once every detached task has finished."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
