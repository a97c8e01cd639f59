"""The workers' client of the KeyBroker service (generated stubs over gRPC).

Each call has a deadline; only UNAVAILABLE is retried (a few times, with backoff and jitter).
The end caller's identity travels along as `keybroker-on-behalf-of` for the broker's audit.
The workers' own audit records go to the broker too (`write_audit_record`, for
workers.audit_recorder): a retried write that had in fact committed leaves the record twice,
which is better than never.
Broker errors come back as the workers' own errors: a data key that does not decrypt means the
stored object is damaged (DATA_LOSS); a revoked customer key or a resource being deleted keep
their status and reason.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import anyio
import anyio.lowlevel
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker.api import key_broker_pb2 as pb
from broker.api import key_broker_pb2_grpc as pb_grpc
from broker.core.audit_event import AuditEvent
from broker.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    KeybrokerError,
    NotFound,
    Unavailable,
)
from broker.core.identity import ON_BEHALF_OF_KEY, REQUEST_ID_KEY
from workers.errors import StoredObjectCorrupt

T = TypeVar("T")
ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class DataKey:
    plaintext: bytes
    wrapped: bytes
    key_id: str


@dataclass(frozen=True, slots=True)
class RewrapResult:
    """One item of a batch re-wrap: the new wrapped key, or the error that item met."""

    wrapped: bytes | None
    key_id: str
    error: KeybrokerError | None


def _reason(exc: grpc.aio.AioRpcError) -> str:
    status: Any = rpc_status.from_call(cast(grpc.Call, exc))
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def translate(code: int | grpc.StatusCode, reason: str, message: str) -> KeybrokerError:
    """A broker error, as the workers report it."""
    if isinstance(code, int):
        code = next(c for c in grpc.StatusCode if c.value[0] == code)
    if reason in ("DECRYPTION_FAILED", "STORED_KEY_CORRUPT"):
        return StoredObjectCorrupt()
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(reason or "NOT_FOUND", message)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(reason or "FAILED_PRECONDITION", message)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(reason or "INVALID_ARGUMENT", message)
    if code == grpc.StatusCode.UNAVAILABLE and reason:
        # The broker answered, and says why it cannot now (its database, its audit trail, a
        # customer's vault): the caller learns the same.
        return Unavailable(reason, message)
    return Unavailable("BROKER_UNAVAILABLE", "the key broker did not answer")


class BrokerClient:
    """Data keys for stored objects, from the broker."""

    def __init__(self, channel: grpc.aio.Channel, deadline: float) -> None:
        self._stub: Any = pb_grpc.KeyBrokerStub(channel)
        self._deadline = deadline

    async def _call(
        self,
        method: Callable[..., Awaitable[T]],
        request: Any,
        on_behalf_of: str,
        request_id: str = "",
    ) -> T:
        metadata: tuple[tuple[str, str], ...] | None = None
        if on_behalf_of:
            metadata = ((ON_BEHALF_OF_KEY, on_behalf_of),)
        if request_id:
            metadata = (*(metadata or ()), (REQUEST_ID_KEY, request_id))
        for attempt in range(ATTEMPTS):
            try:
                return await method(request, timeout=self._deadline, metadata=metadata)
            except asyncio.CancelledError:
                # grpc.aio ends a cancelled call with a CancelledError of its own, which the
                # cancelling anyio scope does not recognise: it would escape that scope (the job
                # runner's, which then never gives its job back). Deliver the scope's own.
                await anyio.lowlevel.checkpoint()
                raise
            except grpc.aio.AioRpcError as exc:
                retry = exc.code() == grpc.StatusCode.UNAVAILABLE and attempt < ATTEMPTS - 1
                if not retry:
                    raise translate(exc.code(), _reason(exc), exc.details() or "") from None
            await asyncio.sleep(random.uniform(0, 0.1 * 2**attempt))  # noqa: S311 -- jitter
        raise AssertionError("unreachable")

    async def generate(self, name: str, on_behalf_of: str = "") -> DataKey:
        reply: pb.GenerateDataKeyResponse = await self._call(
            self._stub.GenerateDataKey, pb.GenerateDataKeyRequest(name=name), on_behalf_of
        )
        return DataKey(reply.plaintext_data_key, reply.wrapped_data_key, reply.key_id)

    async def decrypt(self, name: str, wrapped: bytes, on_behalf_of: str = "") -> bytes:
        """Unwraps a data key read from the workers' own tables. The name is the workers' own,
        so a structural refusal (a malformed key, an unknown format or key version) can only
        mean the stored wrapped key is damaged: DATA_LOSS, like a key that fails to decrypt.
        A revoked customer key, a resource being deleted or a version scheduled for destruction
        (restorable) keep their status and reason."""
        request = pb.DecryptDataKeyRequest(name=name, wrapped_data_key=wrapped)
        try:
            reply: pb.DecryptDataKeyResponse = await self._call(
                self._stub.DecryptDataKey, request, on_behalf_of
            )
        except InvalidArgument:
            raise StoredObjectCorrupt() from None
        except NotFound as exc:
            if exc.reason == "KEY_VERSION_NOT_FOUND":
                raise StoredObjectCorrupt() from None
            raise
        return reply.plaintext_data_key

    async def rewrap_batch(
        self, items: Sequence[tuple[str, bytes]], on_behalf_of: str = ""
    ) -> list[RewrapResult]:
        request = pb.BatchRewrapDataKeysRequest(
            requests=[pb.RewrapDataKeyRequest(name=n, wrapped_data_key=w) for n, w in items]
        )
        reply: pb.BatchRewrapDataKeysResponse = await self._call(
            self._stub.BatchRewrapDataKeys, request, on_behalf_of
        )
        out = []
        for result in reply.results:
            if result.status.code == 0:
                r = result.response
                out.append(
                    RewrapResult(r.wrapped_data_key if r.rewrapped else None, r.key_id, None)
                )
            else:
                reason = ""
                for detail in result.status.details:
                    info = error_details_pb2.ErrorInfo()
                    if detail.Unpack(info):
                        reason = info.reason
                error = translate(result.status.code, reason, result.status.message)
                out.append(RewrapResult(None, "", error))
        return out

    async def resource_state(self, resource_id: str) -> int:
        """The resource's state (key_broker_pb2.Resource.State); DESTROYED when unknown."""
        request = pb.GetResourceRequest(name=f"resources/{resource_id}")
        try:
            reply: pb.GetResourceResponse = await self._call(self._stub.GetResource, request, "")
        except NotFound:
            return int(pb.Resource.DESTROYED)
        return int(reply.resource.state)

    async def key_versions(self, resource_id: str, purpose: str) -> list[pb.ResourceKeyVersion]:
        request = pb.ListResourceKeyVersionsRequest(
            parent=f"resources/{resource_id}/resourceKeys/{purpose}", page_size=1000
        )
        reply: pb.ListResourceKeyVersionsResponse = await self._call(
            self._stub.ListResourceKeyVersions, request, ""
        )
        return list(reply.resource_key_versions)

    async def write_audit_record(self, event: AuditEvent) -> None:
        """Has the broker write `event` into its chained trail (KeyBroker.WriteAuditRecord);
        returns once it is durable. The broker records this process's identity as the caller,
        and `event.caller` as on_behalf_of; the event's request id goes along as the call's."""
        request = pb.WriteAuditRecordRequest(
            operation=event.operation,
            resource=event.resource or "",
            item_count=event.item_count,
            outcome=event.outcome,
            reason=event.reason or "",
            # The broker refuses what is not printable text: an identity that holds such
            # characters (a certificate's, decoded with replacement) is recorded with "?".
            on_behalf_of=event.caller
            if event.caller.isprintable()
            else "".join(c if c.isprintable() else "?" for c in event.caller),
        )
        await self._call(self._stub.WriteAuditRecord, request, "", event.request_id)

    async def destroy_version(self, name: str) -> None:
        request = pb.DestroyResourceKeyVersionRequest(name=name)
        await self._call(self._stub.DestroyResourceKeyVersion, request, "")
