"""A server-side bound on how long a call may run: `DeadlineInterceptor`.

It ends a unary call after `MAX_UNARY_SECONDS` and a streaming call after `MAX_STREAM_SECONDS`
(the servers pass KEYBROKER_MAX_UNARY_DURATION and KEYBROKER_MAX_STREAM_DURATION, which default
to these) when the caller set no deadline or a later one, with DEADLINE_EXCEEDED reason
SERVER_DEADLINE_EXCEEDED, to within WATCHDOG_PERIOD (a deadline the caller set and that comes
first is gRPC's own business).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from broker.core.errors import KeybrokerError
from broker.core.limits import MAX_STREAM_SECONDS, MAX_UNARY_SECONDS
from broker.rpc.interceptors import WrappingInterceptor, rebuild

BOUNDED_PREFIX = "/keybroker."
"""Methods whose path starts with this are bounded by DeadlineInterceptor."""


class DeadlineExceeded(KeybrokerError):
    """The call ran into the server's own bound (`DeadlineInterceptor`)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(self, seconds: float) -> None:
        super().__init__(
            "SERVER_DEADLINE_EXCEEDED",
            f"the call ran longer than the server allows ({seconds:g} s)",
        )


class DeadlineInterceptor(WrappingInterceptor):
    """Bounds every call's run time (see the module docstring).

    Put it after broker.rpc.interceptors.ErrorInterceptor, which turns its DeadlineExceeded into a
    status. The bound cancels the handler's task the way a caller's own deadline does, so it adds
    no new way to be cut short: handlers that touch SQL run detached (broker.core.detached) and the
    hot path's waits are shielded, so a transaction and its audit record finish regardless.
    A download's time blocked on a caller that does not read counts towards its bound, but is
    interrupted only when gRPC's flow control lets the next message go.
    `unary` and `stream` default to MAX_UNARY_SECONDS and MAX_STREAM_SECONDS (read when built).
    Only keybroker.v1's own RPCs are bounded: grpc.health.v1's Watch, which load balancers keep
    open for as long as they watch, and reflection are left alone.
    """

    def __init__(self, unary: float | None = None, stream: float | None = None) -> None:
        self._unary = MAX_UNARY_SECONDS if unary is None else unary
        self._stream = MAX_STREAM_SECONDS if stream is None else stream
        self._watchdog = _Watchdog(period=min(WATCHDOG_PERIOD, self._unary, self._stream))
        super().__init__()

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if not method.startswith(BOUNDED_PREFIX):
            return handler
        # An upload (a stream of requests, one reply) is bounded as a stream.
        return rebuild(
            handler,
            lambda inner, requests_stream: _bounded_call(
                inner, self._stream if requests_stream else self._unary, self._watchdog
            ),
            lambda inner, _: _bounded_stream(inner, self._stream, self._watchdog),
        )


WATCHDOG_PERIOD = 0.5
"""How often overdue calls are looked for: a bound is kept to within this many seconds."""


class _Watchdog:
    """Cancels calls that outrun their bound; cheaper per call than an asyncio.timeout (which
    costs a timer handle and an async context manager per call: several microseconds on the
    hot path). A call registers its task and stop time; one timer, running only while calls are
    registered, looks for overdue ones every `period` seconds and cancels those that are inside
    the handler (`active`); a stream suspended at a yield is stopped when it resumes instead.
    One event loop only."""

    def __init__(self, period: float) -> None:
        self._period = period
        # task -> [stop time, active]
        self._calls: dict[asyncio.Task[Any], list[Any]] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def enter(self, task: asyncio.Task[Any], stop_at: float) -> None:
        self._calls[task] = [stop_at, True]
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._period, self._sweep)

    def active(self, task: asyncio.Task[Any], active: bool) -> None:
        self._calls[task][1] = active

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """True when this watchdog cancelled `task`."""
        return task in self._expired

    def overdue(self, task: asyncio.Task[Any]) -> bool:
        """True when `task` was cancelled by this watchdog, or is past its stop time."""
        if task in self._expired:
            return True
        stop_at: float = self._calls[task][0]
        return asyncio.get_running_loop().time() >= stop_at

    def leave(self, task: asyncio.Task[Any]) -> None:
        self._calls.pop(task, None)
        self._expired.discard(task)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for task, (stop_at, active) in list(self._calls.items()):
            if active and stop_at <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        self._timer = loop.call_later(self._period, self._sweep) if self._calls else None


def _bound(context: grpc.aio.ServicerContext[Any, Any], limit: float) -> float | None:
    """The absolute loop time to stop at, or None when the caller's own deadline comes first."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= limit:
        return None
    return asyncio.get_running_loop().time() + limit


def _bounded_call(inner: Any, limit: float, watchdog: _Watchdog) -> Any:
    # The stubs type handlers as sync callables; under grpc.aio they are coroutines.
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        stop_at = _bound(context, limit)
        if stop_at is None:
            return await inner(request, context)
        task = asyncio.current_task()
        assert task is not None
        watchdog.enter(task, stop_at)
        try:
            return await inner(request, context)
        except asyncio.CancelledError:
            if not watchdog.expired(task):
                raise
            task.uncancel()
            raise DeadlineExceeded(limit) from None
        finally:
            watchdog.leave(task)

    return call


def _bounded_stream(inner: Any, limit: float, watchdog: _Watchdog) -> Any:
    async def stream(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        stop_at = _bound(context, limit)
        task = asyncio.current_task()
        assert task is not None
        responses = inner(request, context)
        if stop_at is not None:
            watchdog.enter(task, stop_at)
        try:
            while True:
                # The bound covers the handler's own awaits; at a yield the generator is not
                # cancelled (the cancellation would land in gRPC's send) but checked on resuming.
                if stop_at is not None:
                    if watchdog.overdue(task):
                        raise DeadlineExceeded(limit)
                    watchdog.active(task, True)
                try:
                    item = await anext(responses)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if stop_at is None or not watchdog.expired(task):
                        raise
                    task.uncancel()
                    raise DeadlineExceeded(limit) from None
                if stop_at is not None:
                    watchdog.active(task, False)
                yield item
        finally:
            if stop_at is not None:
                watchdog.leave(task)
            # Closed here, not left to the garbage collector: its cleanup (a stream slot, a
            # blob reader) runs now.
            await responses.aclose()

    return stream
