"""Whether this process can serve, as a set of named conditions (the database answers, the master
key opens) that background checks keep up to date and that the health service follows.

A condition that fails turns grpc.health.v1 NOT_SERVING for every service of the process (the
process cannot serve any keybroker call without it); the name-less GetStatus names what fails.
Things that are one resource's business (a revoked customer key) are never conditions here.
"""

from __future__ import annotations

import anyio


class Readiness:
    """Named conditions, all true at first; one event loop only."""

    def __init__(self) -> None:
        self._failing: set[str] = set()
        self._changed = anyio.Event()

    @property
    def serving(self) -> bool:
        return not self._failing

    @property
    def failing(self) -> list[str]:
        """The conditions that fail now, sorted."""
        return sorted(self._failing)

    def set(self, condition: str, ok: bool) -> None:
        """Records `condition`; wakes whoever awaits `changed()` when serving changes."""
        was = self.serving
        if ok:
            self._failing.discard(condition)
        else:
            self._failing.add(condition)
        if self.serving != was:
            changed, self._changed = self._changed, anyio.Event()
            changed.set()

    async def changed(self) -> bool:
        """Waits until serving changes; returns it then (the latest, if several changes came)."""
        await self._changed.wait()
        return self.serving
