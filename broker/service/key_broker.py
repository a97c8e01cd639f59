"""The KeyBroker gRPC service: request validation, audit, and the mapping to keybroker.v1 messages.

Every RPC is audited. A state change that succeeds writes its record inside its own transaction
(broker.lifecycle); every other outcome (reads, data-key calls, rejections) goes through the
group-committed AuditLog, and the reply waits until its record is durable.

One RPC writes someone else's record: WriteAuditRecord takes a record from a workers process
(which holds no master key, so cannot chain records itself) and writes it, with the
authenticated caller as its caller, into this process's chained trail. That record is the
audit of the call: a successful call writes exactly that one record, a refused one the usual
record of a refused WriteAuditRecord.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from broker.api import key_broker_pb2 as pb
from broker.api import key_broker_pb2_grpc as pb_grpc
from broker.api import storage_pb2 as spb
from broker.audit import reading
from broker.audit.log import AuditLog
from broker.core.audit_event import AuditEvent
from broker.core.clock import Clock, utc_now
from broker.core.detached import DetachedWork
from broker.core.errors import InvalidArgument, KeybrokerError
from broker.core.identity import call_identity
from broker.core.limits import MAX_BATCH_SIZE
from broker.core.names import (
    check_resource_id,
    parse_key_version,
    parse_object,
    parse_resource,
    parse_resource_key,
    resource_name,
)
from broker.keys.customer_key_checks import CustomerKeyChecks
from broker.keys.data_keys import DataKeys
from broker.lifecycle.customer_keys import FULL_SCOPE, LEGACY_SCOPE, CustomerKeys, check_reference
from broker.lifecycle.resources import Lifecycle, ResourceView
from broker.providers import KeyReference
from broker.rpc import fields
from broker.rpc.interceptors import status_proto
from broker.service import convert

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[["KeyBrokerService", Req, Context, AuditEvent], Awaitable[Resp]]
Item = TypeVar("Item")
Result = TypeVar("Result")

VERSION = "0.1.0"

WORKER_OPERATIONS = frozenset(
    {
        # workers.retention: the sweep of expired analyze results, and the purge of a destroyed
        # resource's objects.
        "ExpireAnalyzeResults",
        "PurgeResourceObjects",
        # Storage calls refused by the workers' authorization (broker.rpc.authz).
        *(m.name for m in spb.DESCRIPTOR.services_by_name["Storage"].methods),
    }
)
"""The operations WriteAuditRecord accepts: a closed set, so a caller cannot pass its records
off as the broker's own (a forged "DestroyResourceKeyVersion", say)."""

MAX_ON_BEHALF_OF_LENGTH = 200
"""Longest on_behalf_of a WriteAuditRecord may carry (as broker.core.identity cuts the metadata)."""

_OUTCOMES = frozenset(code.name for code in grpc.StatusCode)
# An ErrorInfo reason (UPPER_SNAKE_CASE); the column holds 64 characters.
_REASON_RE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def audited(
    operation: str, *, changes_state: bool = False, hot_path: bool = False
) -> Callable[[Handler[Req, Resp]], Callable[[KeyBrokerService, Req, Context], Awaitable[Resp]]]:
    """Wraps a handler so that its call is audited exactly once, whatever its outcome.

    `changes_state`: on success the handler's transaction already holds the record.
    `hot_path`: the handler runs in the RPC's task. Others touch SQL and run detached
    (broker.core.detached), so a cancelled call still finishes its transaction and its record; the
    data-key handlers need not: their only waits (a cache load, the audit group) are shielded.
    """

    def decorate(
        fn: Handler[Req, Resp],
    ) -> Callable[[KeyBrokerService, Req, Context], Awaitable[Resp]]:
        @functools.wraps(fn)
        async def handler(self: KeyBrokerService, request: Req, context: Context) -> Resp:
            caller, on_behalf_of, request_id = call_identity(context)
            event = AuditEvent(operation, caller, request_id, on_behalf_of)
            work = run(self, request, context, event)
            return await (work if hot_path else self.detached.run(work))

        async def run(
            self: KeyBrokerService, request: Req, context: Context, event: AuditEvent
        ) -> Resp:
            try:
                response = await fn(self, request, context, event)
            except KeybrokerError as exc:
                event.outcome, event.reason = exc.code.name, exc.reason
                event.key_ids.update(exc.key_ids)
                await self.audit.record(event)
                raise
            except Exception:
                event.outcome, event.reason = "INTERNAL", "INTERNAL"
                await self.audit.record(event)
                raise
            if not changes_state:
                await self.audit.record(event)
            return response

        return handler

    return decorate


class KeyBrokerService(pb_grpc.KeyBrokerServicer):
    """keybroker.v1.KeyBroker over Lifecycle (state changes) and DataKeys (the hot path)."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        customer_keys: CustomerKeys,
        data: DataKeys,
        audit: AuditLog,
        status: Callable[[], pb.GetStatusResponse],
        checks: CustomerKeyChecks,
        now: Clock = utc_now,
    ) -> None:
        self.lifecycle = lifecycle
        self.checks = checks
        self._now = now
        self.customer_keys = customer_keys
        self.data = data
        self.audit = audit
        self._status = status
        self.detached = DetachedWork()

    # -- resources -------------------------------------------------------------------------

    @audited("CreateResource", changes_state=True)
    async def CreateResource(
        self, request: pb.CreateResourceRequest, context: Context, event: AuditEvent
    ) -> pb.CreateResourceResponse:
        resource_id = check_resource_id(request.resource_id)
        event.resource = resource_name(resource_id)
        view = await self.lifecycle.create_resource(resource_id, event)
        return pb.CreateResourceResponse(resource=_resource(view))

    @audited("ImportResource", changes_state=True)
    async def ImportResource(
        self, request: pb.ImportResourceRequest, context: Context, event: AuditEvent
    ) -> pb.ImportResourceResponse:
        resource_id = check_resource_id(request.resource_id)
        event.resource = resource_name(resource_id)
        if not request.HasField("create_time"):
            raise InvalidArgument("MISSING_FIELD", "create_time is required")
        create_time = convert.create_time(request.create_time)
        reference = None
        if request.HasField("customer_managed_key"):
            reference = _reference(request.customer_managed_key, follow_latest=False)
            # Check the key before anything is created, so a refusal leaves nothing behind.
            reference = await self.customer_keys.check_key(reference)
        elif request.legacy_customer_managed_key_scope:
            raise InvalidArgument(
                "INVALID_ARGUMENT",
                "legacy_customer_managed_key_scope needs customer_managed_key",
            )
        view = await self.lifecycle.create_resource(resource_id, event, create_time=create_time)
        if reference is not None:
            scope = LEGACY_SCOPE if request.legacy_customer_managed_key_scope else FULL_SCOPE
            cmk_event = AuditEvent(
                "EnableCustomerManagedKey",
                event.caller,
                event.request_id,
                event.on_behalf_of,
                resource=event.resource,
            )
            view = await self.customer_keys.enable(
                resource_id, reference, False, cmk_event, scope=scope
            )
        return pb.ImportResourceResponse(resource=_resource(view))

    @audited("GetResource")
    async def GetResource(
        self, request: pb.GetResourceRequest, context: Context, event: AuditEvent
    ) -> pb.GetResourceResponse:
        resource_id = parse_resource(request.name)
        event.resource = request.name
        return pb.GetResourceResponse(
            resource=_resource(await self.lifecycle.get_resource(resource_id))
        )

    @audited("ListResources")
    async def ListResources(
        self, request: pb.ListResourcesRequest, context: Context, event: AuditEvent
    ) -> pb.ListResourcesResponse:
        size = fields.page_size(request.page_size)
        after = fields.decode_page_token("r", request.page_token) or ""
        views = await self.lifecycle.list_resources(after, size + 1)
        response = pb.ListResourcesResponse(resources=[_resource(v) for v in views[:size]])
        if len(views) > size:
            response.next_page_token = fields.encode_page_token("r", views[size - 1].resource.id)
        event.item_count = len(response.resources)
        return response

    @audited("DeleteResource", changes_state=True)
    async def DeleteResource(
        self, request: pb.DeleteResourceRequest, context: Context, event: AuditEvent
    ) -> pb.DeleteResourceResponse:
        resource_id = parse_resource(request.name)
        event.resource = request.name
        window = convert.pending_window(request.HasField("pending_window"), request.pending_window)
        view = await self.lifecycle.delete_resource(resource_id, window, event)
        return pb.DeleteResourceResponse(resource=_resource(view))

    @audited("UndeleteResource", changes_state=True)
    async def UndeleteResource(
        self, request: pb.UndeleteResourceRequest, context: Context, event: AuditEvent
    ) -> pb.UndeleteResourceResponse:
        resource_id = parse_resource(request.name)
        event.resource = request.name
        view = await self.lifecycle.undelete_resource(resource_id, event)
        return pb.UndeleteResourceResponse(resource=_resource(view))

    # -- customer-managed keys -------------------------------------------------------------

    @audited("EnableCustomerManagedKey", changes_state=True)
    async def EnableCustomerManagedKey(
        self, request: pb.EnableCustomerManagedKeyRequest, context: Context, event: AuditEvent
    ) -> pb.EnableCustomerManagedKeyResponse:
        resource_id = parse_resource(request.name)
        event.resource = request.name
        reference = _reference(request.key, request.follow_latest)
        view = await self.customer_keys.enable(resource_id, reference, request.follow_latest, event)
        return pb.EnableCustomerManagedKeyResponse(resource=_resource(view))

    @audited("UpdateCustomerManagedKey", changes_state=True)
    async def UpdateCustomerManagedKey(
        self, request: pb.UpdateCustomerManagedKeyRequest, context: Context, event: AuditEvent
    ) -> pb.UpdateCustomerManagedKeyResponse:
        resource_id = parse_resource(request.name)
        event.resource = request.name
        reference = _reference(request.key, request.follow_latest)
        view = await self.customer_keys.update(resource_id, reference, request.follow_latest, event)
        return pb.UpdateCustomerManagedKeyResponse(resource=_resource(view))

    @audited("DisableCustomerManagedKey", changes_state=True)
    async def DisableCustomerManagedKey(
        self, request: pb.DisableCustomerManagedKeyRequest, context: Context, event: AuditEvent
    ) -> pb.DisableCustomerManagedKeyResponse:
        resource_id = parse_resource(request.name)
        event.resource = request.name
        view = await self.customer_keys.disable(resource_id, event)
        return pb.DisableCustomerManagedKeyResponse(resource=_resource(view))

    # -- resource keys ---------------------------------------------------------------------

    @audited("RotateResourceKey", changes_state=True)
    async def RotateResourceKey(
        self, request: pb.RotateResourceKeyRequest, context: Context, event: AuditEvent
    ) -> pb.RotateResourceKeyResponse:
        resource_id, purpose = parse_resource_key(request.name)
        event.resource = resource_name(resource_id)
        row = await self.lifecycle.rotate(resource_id, purpose, event)
        message = convert.key_version(row, current_version=row.version)
        return pb.RotateResourceKeyResponse(resource_key_version=message)

    @audited("ListResourceKeyVersions")
    async def ListResourceKeyVersions(
        self, request: pb.ListResourceKeyVersionsRequest, context: Context, event: AuditEvent
    ) -> pb.ListResourceKeyVersionsResponse:
        resource_id, purpose = parse_resource_key(request.parent, "parent")
        event.resource = resource_name(resource_id)
        size = fields.page_size(request.page_size)
        position = fields.decode_page_token("v", request.page_token)
        before = None
        if position is not None:
            if not position.isdigit() or len(position) > 9:
                raise InvalidArgument(
                    "INVALID_PAGE_TOKEN", "page_token is not one this call returned"
                )
            before = int(position)
        ring, rows = await self.lifecycle.list_versions(resource_id, purpose, before, size + 1)
        response = pb.ListResourceKeyVersionsResponse(
            resource_key_versions=[
                convert.key_version(r, ring.current_version) for r in rows[:size]
            ]
        )
        if len(rows) > size:
            response.next_page_token = fields.encode_page_token("v", str(rows[size - 1].version))
        event.item_count = len(response.resource_key_versions)
        return response

    @audited("DestroyResourceKeyVersion", changes_state=True)
    async def DestroyResourceKeyVersion(
        self, request: pb.DestroyResourceKeyVersionRequest, context: Context, event: AuditEvent
    ) -> pb.DestroyResourceKeyVersionResponse:
        name = parse_key_version(request.name)
        event.resource = resource_name(name.resource_id)
        event.key_ids.add(str(name))
        window = convert.pending_window(request.HasField("pending_window"), request.pending_window)
        ring, row = await self.lifecycle.destroy_version(name, window, event)
        return pb.DestroyResourceKeyVersionResponse(
            resource_key_version=convert.key_version(row, ring.current_version)
        )

    @audited("RestoreResourceKeyVersion", changes_state=True)
    async def RestoreResourceKeyVersion(
        self, request: pb.RestoreResourceKeyVersionRequest, context: Context, event: AuditEvent
    ) -> pb.RestoreResourceKeyVersionResponse:
        name = parse_key_version(request.name)
        event.resource = resource_name(name.resource_id)
        event.key_ids.add(str(name))
        ring, row = await self.lifecycle.restore_version(name, event)
        return pb.RestoreResourceKeyVersionResponse(
            resource_key_version=convert.key_version(row, ring.current_version)
        )

    # -- data keys: the hot path -----------------------------------------------------------------

    @audited("GenerateDataKey", hot_path=True)
    async def GenerateDataKey(
        self, request: pb.GenerateDataKeyRequest, context: Context, event: AuditEvent
    ) -> pb.GenerateDataKeyResponse:
        obj = parse_object(request.name)
        # Only a name that parsed reaches the audit trail: a NUL or an over-long name would fail
        # the whole group commit on PostgreSQL.
        event.resource = obj.name
        key = await self.data.generate(obj, request.associated_data)
        event.key_ids.add(key.key_id)
        return pb.GenerateDataKeyResponse(
            plaintext_data_key=key.plaintext, wrapped_data_key=key.wrapped, key_id=key.key_id
        )

    @audited("DecryptDataKey", hot_path=True)
    async def DecryptDataKey(
        self, request: pb.DecryptDataKeyRequest, context: Context, event: AuditEvent
    ) -> pb.DecryptDataKeyResponse:
        obj = parse_object(request.name)
        event.resource = obj.name
        plaintext, key_id = await self.data.decrypt(
            obj, request.wrapped_data_key, request.associated_data
        )
        event.key_ids.add(key_id)
        return pb.DecryptDataKeyResponse(plaintext_data_key=plaintext, key_id=key_id)

    @audited("RewrapDataKey", hot_path=True)
    async def RewrapDataKey(
        self, request: pb.RewrapDataKeyRequest, context: Context, event: AuditEvent
    ) -> pb.RewrapDataKeyResponse:
        obj = parse_object(request.name)
        event.resource = obj.name
        key = await self.data.rewrap(obj, request.wrapped_data_key, request.associated_data)
        event.key_ids.add(key.key_id)
        return pb.RewrapDataKeyResponse(
            wrapped_data_key=key.wrapped, key_id=key.key_id, rewrapped=key.rewrapped
        )

    @audited("BatchGenerateDataKeys", hot_path=True)
    async def BatchGenerateDataKeys(
        self, request: pb.BatchGenerateDataKeysRequest, context: Context, event: AuditEvent
    ) -> pb.BatchGenerateDataKeysResponse:
        async def one(item: pb.GenerateDataKeyRequest) -> pb.GenerateDataKeyResult:
            key = await self.data.generate(parse_object(item.name), item.associated_data)
            event.key_ids.add(key.key_id)
            return pb.GenerateDataKeyResult(
                response=pb.GenerateDataKeyResponse(
                    plaintext_data_key=key.plaintext,
                    wrapped_data_key=key.wrapped,
                    key_id=key.key_id,
                )
            )

        results = await _batch(request.requests, one, _generate_failed, event)
        return pb.BatchGenerateDataKeysResponse(results=results)

    @audited("BatchDecryptDataKeys", hot_path=True)
    async def BatchDecryptDataKeys(
        self, request: pb.BatchDecryptDataKeysRequest, context: Context, event: AuditEvent
    ) -> pb.BatchDecryptDataKeysResponse:
        async def one(item: pb.DecryptDataKeyRequest) -> pb.DecryptDataKeyResult:
            plaintext, key_id = await self.data.decrypt(
                parse_object(item.name), item.wrapped_data_key, item.associated_data
            )
            event.key_ids.add(key_id)
            return pb.DecryptDataKeyResult(
                response=pb.DecryptDataKeyResponse(plaintext_data_key=plaintext, key_id=key_id)
            )

        results = await _batch(request.requests, one, _decrypt_failed, event)
        return pb.BatchDecryptDataKeysResponse(results=results)

    @audited("BatchRewrapDataKeys", hot_path=True)
    async def BatchRewrapDataKeys(
        self, request: pb.BatchRewrapDataKeysRequest, context: Context, event: AuditEvent
    ) -> pb.BatchRewrapDataKeysResponse:
        async def one(item: pb.RewrapDataKeyRequest) -> pb.RewrapDataKeyResult:
            key = await self.data.rewrap(
                parse_object(item.name), item.wrapped_data_key, item.associated_data
            )
            event.key_ids.add(key.key_id)
            return pb.RewrapDataKeyResult(
                response=pb.RewrapDataKeyResponse(
                    wrapped_data_key=key.wrapped, key_id=key.key_id, rewrapped=key.rewrapped
                )
            )

        results = await _batch(request.requests, one, _rewrap_failed, event)
        return pb.BatchRewrapDataKeysResponse(results=results)

    # -- status ------------------------------------------------------------------------------

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: Context
    ) -> pb.GetStatusResponse:
        """Without a name: the process's status, from counters and flags it keeps in memory
        (no SQL, no vault), not audited: a health probe, polled, that must answer while the
        database is down. With a name: the resource's status, audited (_resource_status)."""
        if request.name:
            return await self._resource_status(request, context)
        return self._status()

    @audited("GetStatus")
    async def _resource_status(
        self, request: pb.GetStatusRequest, context: Context, event: AuditEvent
    ) -> pb.GetStatusResponse:
        resource_id = parse_resource(request.name)
        event.resource = request.name
        view = await self.lifecycle.get_resource(resource_id)
        response = self._status()
        encryption = _resource(view).encryption
        response.encryption.extend(encryption)
        customer = next(
            (e.root_key_id for e in encryption if e.key_source == pb.CUSTOMER_MANAGED), None
        )
        check = self.checks.get(customer) if customer else None
        if check is not None:
            response.customer_key_probe.CopyFrom(
                pb.CustomerKeyProbe(
                    key_id=check.key_id,
                    ok=check.ok,
                    reason=check.reason,
                    check_time=fields.timestamp(check.time),
                    age=fields.duration(self._now() - check.time),
                )
            )
            if not check.ok and response.healthz == "ok":
                response.healthz = f"customer-managed key unavailable ({check.reason})"
        return response

    # -- the audit trail ---------------------------------------------------------------------

    @audited("ListAuditRecords")
    async def ListAuditRecords(
        self, request: pb.ListAuditRecordsRequest, context: Context, event: AuditEvent
    ) -> pb.ListAuditRecordsResponse:
        parse_resource(request.parent, "parent")
        event.resource = request.parent
        size = fields.page_size(request.page_size)
        position = fields.decode_page_token("a", request.page_token)
        after = 0
        if position is not None:
            if not position.isdigit() or len(position) > 18:
                raise InvalidArgument(
                    "INVALID_PAGE_TOKEN", "page_token is not one this call returned"
                )
            after = int(position)
        start = reading.time_bound(request, "start_time")
        end = reading.time_bound(request, "end_time")
        if start is not None and end is not None and start > end:
            raise InvalidArgument("INVALID_TIME_RANGE", "start_time is after end_time")
        rows = await reading.page(
            self.audit.engine, request.parent, after_id=after, start=start, end=end, limit=size + 1
        )
        response = pb.ListAuditRecordsResponse(
            audit_records=[reading.message(request.parent, r) for r in rows[:size]]
        )
        if len(rows) > size:
            response.next_page_token = fields.encode_page_token("a", str(rows[size - 1].id))
        event.item_count = len(response.audit_records)
        return response

    @audited("WriteAuditRecord")
    async def WriteAuditRecord(
        self, request: pb.WriteAuditRecordRequest, context: Context, event: AuditEvent
    ) -> pb.WriteAuditRecordResponse:
        # The decorator writes `event` once this returns: made into the workers' record here,
        # it is the one record of this call (caller: the authenticated caller, from the
        # decorator; never a name from the request). Group-committed, like any call's record,
        # and the reply waits for it. Detached (not hot_path): a caller that gives up still
        # gets its record written.
        _worker_record(request, event)
        return pb.WriteAuditRecordResponse()


def _worker_record(request: pb.WriteAuditRecordRequest, event: AuditEvent) -> None:
    """Checks every field of a WriteAuditRecord first, then turns `event` (the call's own record)
    into the workers' record: a refused request leaves the event as the decorator made it.
    Every string is checked before it reaches the trail, since a NUL or an over-long value
    would fail the whole group commit on PostgreSQL."""
    if not request.operation:
        raise InvalidArgument("MISSING_FIELD", "operation is required")
    if request.operation not in WORKER_OPERATIONS:
        # Not echoed: the value may be anything.
        raise InvalidArgument("UNKNOWN_OPERATION", "operation is not one the workers record")
    resource = None
    if request.resource:
        parse_resource(request.resource, "resource")
        resource = request.resource
    if request.item_count < 0:
        raise InvalidArgument("INVALID_ITEM_COUNT", "item_count must not be negative")
    outcome = request.outcome or "OK"
    if outcome not in _OUTCOMES:
        raise InvalidArgument("INVALID_OUTCOME", "outcome must be OK or a gRPC status code name")
    if request.reason and (outcome == "OK" or not _REASON_RE.fullmatch(request.reason)):
        raise InvalidArgument(
            "INVALID_REASON",
            "reason must be an ErrorInfo reason (A-Z, 0-9, _; at most 64) of a failed outcome",
        )
    on_behalf_of = request.on_behalf_of
    if len(on_behalf_of) > MAX_ON_BEHALF_OF_LENGTH:
        raise InvalidArgument(
            "FIELD_TOO_LONG", f"on_behalf_of is longer than {MAX_ON_BEHALF_OF_LENGTH} characters"
        )
    if not on_behalf_of.isprintable():
        raise InvalidArgument("INVALID_ON_BEHALF_OF", "on_behalf_of must be printable text")
    event.operation = request.operation
    event.resource = resource
    event.item_count = request.item_count
    event.outcome = outcome
    event.reason = request.reason or None
    if on_behalf_of:
        event.on_behalf_of = on_behalf_of


def _resource(view: ResourceView) -> pb.Resource:
    return convert.resource(view.resource, tuple(view.rings), view.customer_key)


def _reference(key: pb.CustomerKeyReference, follow_latest: bool) -> KeyReference:
    return check_reference(
        key.provider, key.vault, key.key_name, key.version, key.identity, follow_latest
    )


def _generate_failed(status: Any) -> pb.GenerateDataKeyResult:
    return pb.GenerateDataKeyResult(status=status)


def _decrypt_failed(status: Any) -> pb.DecryptDataKeyResult:
    return pb.DecryptDataKeyResult(status=status)


def _rewrap_failed(status: Any) -> pb.RewrapDataKeyResult:
    return pb.RewrapDataKeyResult(status=status)


async def _batch(
    items: Sequence[Item],
    one: Callable[[Item], Awaitable[Result]],
    failed: Callable[[Any], Result],
    event: AuditEvent,
) -> list[Result]:
    """Runs `one` per item; a KeybrokerError becomes that item's status, the others go on."""
    count = len(items)
    if count == 0:
        raise InvalidArgument("MISSING_FIELD", "requests must hold at least one item")
    if count > MAX_BATCH_SIZE:
        raise InvalidArgument("BATCH_TOO_LARGE", f"requests holds more than {MAX_BATCH_SIZE} items")
    event.item_count = count
    resources = {_resource_of(getattr(i, "name", "")) for i in items}
    event.resource = resources.pop() if len(resources) == 1 else None
    results: list[Result] = []
    for item in items:
        try:
            results.append(await one(item))
        except KeybrokerError as exc:
            event.failed_count += 1
            event.key_ids.update(exc.key_ids)
            results.append(failed(status_proto(exc)))
    return results


def _resource_of(name: str) -> str | None:
    try:
        return resource_name(parse_object(name).resource_id)
    except KeybrokerError:
        return None
