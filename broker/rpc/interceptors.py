"""The one place where exceptions become gRPC statuses.

A KeybrokerError becomes its status code and client-safe message plus a google.rpc.ErrorInfo
(reason, domain "keybroker"); a database outage (broker.db.outages) becomes UNAVAILABLE, reason
DATABASE_UNAVAILABLE; anything else becomes INTERNAL with a generic message, its traceback going
to the log and never into the reply.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker.core.errors import ERROR_DOMAIN, KeybrokerError
from broker.db.availability import DatabaseAvailability
from broker.db.outages import DatabaseUnavailable, is_outage

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error"


def status_proto(error: KeybrokerError) -> status_pb2.Status:
    """A google.rpc.Status with an ErrorInfo detail for `error` (also used per batch item)."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN))
    return status_pb2.Status(code=error.code.value[0], message=error.message, details=[detail])


def internal_status() -> status_pb2.Status:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN))
    return status_pb2.Status(code=code_pb2.INTERNAL, message=INTERNAL_MESSAGE, details=[detail])


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception, method: str) -> None:
    if isinstance(exc, KeybrokerError):
        status = status_proto(exc)
    elif is_outage(exc):
        # Not a bug: the database is stopped, unreachable, locked or full. No traceback, and no
        # message: a driver's message can quote the statement and its parameters.
        log.warning("%s: database unavailable (%s)", method, type(exc).__name__)
        status = status_proto(DatabaseUnavailable())
    else:
        log.error("unexpected error in %s", method, exc_info=exc)
        status = internal_status()
    await context.abort_with_status(rpc_status.to_status(status))


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that wraps each method's handler once (`wrap`) and then serves the wrapped
    handler from a cache: per call it costs one dict lookup. A method with no handler stays
    without one (UNIMPLEMENTED, and no handler runs)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler to serve `method` with from now on."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        wrapped = self.wrap(handler, method)
        self._wrapped[method] = wrapped
        return wrapped


def rebuild(
    handler: grpc.RpcMethodHandler[Any, Any],
    around_call: Callable[[Any, bool], Any],
    around_stream: Callable[[Any, bool], Any],
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of `handler`'s kind, with its serializers, whose body is
    `around_call(inner, requests_stream)` when the method answers with one message and
    `around_stream(inner, requests_stream)` when it answers with a stream; `inner` is the
    original body and `requests_stream` says whether the request side is a stream.
    (The stubs type bodies as sync callables; under grpc.aio they are coroutine functions or
    async generator functions, hence Any.) A streaming method whose body is a coroutine function
    writes its messages itself (`context.write`, as grpc.health.v1's Watch does): it is wrapped
    as a call, since wrapping it as a stream would iterate a coroutine."""
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        body = around_call(handler.unary_unary, False)
        return grpc.unary_unary_rpc_method_handler(body, **serializers)
    if handler.stream_unary is not None:
        body = around_call(handler.stream_unary, True)
        return grpc.stream_unary_rpc_method_handler(body, **serializers)
    if handler.unary_stream is not None:
        inner = handler.unary_stream
        around = around_stream if inspect.isasyncgenfunction(inner) else around_call
        return grpc.unary_stream_rpc_method_handler(around(inner, False), **serializers)
    assert handler.stream_stream is not None
    inner = handler.stream_stream
    around = around_stream if inspect.isasyncgenfunction(inner) else around_call
    return grpc.stream_stream_rpc_method_handler(around(inner, True), **serializers)


GATED_PREFIX = "/keybroker."
"""keybroker's own RPCs need the database (each is audited); health and reflection do not."""
UNGATED = frozenset({"/keybroker.v1.KeyBroker/GetStatus"})
"""Answers from memory, so that it works while the database does not."""


class ErrorInterceptor(WrappingInterceptor):
    """Translates exceptions raised by handlers (see the module docstring). With `availability`,
    a call that needs the database is refused at once while the database is known to be down,
    and every failure is reported to it."""

    def __init__(self, availability: DatabaseAvailability | None = None) -> None:
        super().__init__()
        self._availability = availability

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        gate = self._availability
        if gate is not None and (not method.startswith(GATED_PREFIX) or method in UNGATED):
            gate = None
        report = self._availability.report if self._availability is not None else None
        return rebuild(
            handler,
            lambda inner, _: _translating_call(inner, method, gate, report),
            lambda inner, _: _translating_stream(inner, method, gate, report),
        )


Report = Callable[[BaseException], None] | None


def _translating_call(
    inner: Any, method: str, gate: DatabaseAvailability | None, report: Report
) -> Any:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            if gate is not None:
                gate.check()
            return await inner(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 -- the one place that must catch everything
            if report is not None:
                report(exc)
            await _abort(context, exc, method)

    return call


def _translating_stream(
    inner: Any, method: str, gate: DatabaseAvailability | None, report: Report
) -> Any:
    async def stream(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            if gate is not None:
                gate.check()
            async for item in inner(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 -- the one place that must catch everything
            if report is not None:
                report(exc)
            await _abort(context, exc, method)

    return stream
