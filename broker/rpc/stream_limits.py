"""A per-caller count of open Storage streams (uploads and downloads): `StreamLimiter`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from broker.core.errors import ResourceExhausted
from broker.core.limits import MAX_STREAMS_PER_CALLER


def caller_key(identity: str) -> str:
    """The caller a stream counts against. A transport peer (`ipv4:127.0.0.1:50123`, used until
    mutual TLS names callers) loses its port, so that new connections do not buy new streams."""
    for prefix in ("ipv4:", "ipv6:"):
        if identity.startswith(prefix):
            host, sep, port = identity.rpartition(":")
            if sep and port.isdigit() and host != prefix.rstrip(":"):
                return host
    return identity


class StreamLimiter:
    """Counts the open streams of each caller; `hold` refuses one over the limit.

    One event loop only (no lock): the count changes only between awaits.
    """

    def __init__(self, limit: int = MAX_STREAMS_PER_CALLER) -> None:
        self._limit = limit
        self._open: dict[str, int] = {}

    def open_streams(self, identity: str) -> int:
        return self._open.get(caller_key(identity), 0)

    @contextlib.contextmanager
    def hold(self, identity: str) -> Iterator[None]:
        """Counts one stream of `identity` while the block runs; RESOURCE_EXHAUSTED (reason
        TOO_MANY_STREAMS) when that caller already has `limit` open."""
        key = caller_key(identity)
        count = self._open.get(key, 0)
        if count >= self._limit:
            raise ResourceExhausted(
                "TOO_MANY_STREAMS",
                f"this caller already has {self._limit} uploads or downloads open",
            )
        self._open[key] = count + 1
        try:
            yield
        finally:
            left = self._open[key] - 1
            if left:
                self._open[key] = left
            else:
                del self._open[key]
