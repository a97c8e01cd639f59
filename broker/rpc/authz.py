"""Authorization: every RPC of keybroker.v1.KeyBroker and keybroker.v1.Storage against the caller's
grant in the policy (broker.rpc.policy).

Placement: `AuthzInterceptor` goes AFTER `ErrorInterceptor` in the server's interceptor list, so
its wrapper runs INSIDE the error translation: a refusal is a `PermissionDenied` (a KeybrokerError)
that ErrorInterceptor turns into PERMISSION_DENIED with an ErrorInfo reason, like every other
error. The interceptor is installed only when a policy is configured; without one (loopback dev
mode, or TLS with the explicit allow-all setting) nothing is added to the call path.

Per call (the wrapped handler is cached per method, as ErrorInterceptor does):
1. The caller's identity (broker.core.identity.caller: the client certificate's SAN URI) selects its
   grant. The method's rule (METHOD_RULES) names the roles that may call it; `ANY` means any
   authenticated caller (the TLS handshake already refused callers without a valid certificate).
   A method missing from METHOD_RULES is refused: fail closed.
2. A grant limited to resources is checked against the resources the request names: the
   `resource_id`, `name`, `parent`, `model` and `resource` fields and the `name` of each batch
   item. A role-restricted call that names no resource (ListResources) is refused to a limited
   grant. Where the request does not reach the interceptor whole (client-streaming uploads,
   whose name is in the first message) or names no resource (GetJob's `jobs/{id}`), the rule is
   `deferred`: the grant goes into a context variable and the handler calls `check_name` or
   `check_resource` once it has parsed the name (workers.storage_service).
3. A refusal is audited (outcome PERMISSION_DENIED, reason PERMISSION_DENIED or
   RESOURCE_NOT_PERMITTED) through the `record` callable the server gives: the broker's group
   committed AuditLog.record; a workers process on its own sends it to the broker
   (WriteAuditRecord, workers.audit_recorder), which chains it in its own trail. Then the call
   fails; no handler work has happened.

Workers acting for an end caller: the broker sees the workers' certificate and checks the
workers' grant (the end caller in `keybroker-on-behalf-of` is recorded, never trusted); Storage
sees the end caller's certificate and checks that.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from broker.core.audit_event import AuditEvent
from broker.core.errors import KeybrokerError
from broker.core.identity import call_identity, caller
from broker.core.names import RESOURCE_ID_RE
from broker.core.settings import Settings
from broker.rpc.interceptors import WrappingInterceptor, rebuild
from broker.rpc.policy import ADMIN, AUDITOR, DATA_PLANE, Grant, Policy, load_policy

PERMISSION_DENIED = "PERMISSION_DENIED"
RESOURCE_NOT_PERMITTED = "RESOURCE_NOT_PERMITTED"

Context = grpc.aio.ServicerContext[Any, Any]
Record = Callable[[AuditEvent], Awaitable[None]]


class PermissionDenied(KeybrokerError):
    """The caller's grant does not allow this method, or this resource."""

    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, reason: str, message: str, resource: str | None = None) -> None:
        super().__init__(reason, message)
        # The refused resource's name, when it parsed (for the audit record only).
        self.resource = resource


@dataclass(frozen=True, slots=True)
class Rule:
    """Who may call a method: `roles` (None: any authenticated caller); `deferred`: the handler
    checks the resource itself (see the module docstring)."""

    roles: frozenset[str] | None
    deferred: bool = False


ANY = Rule(None)
_ADMIN = Rule(frozenset({ADMIN}))
_ADMIN_DEFERRED = Rule(frozenset({ADMIN}), deferred=True)
_ADMIN_OR_AUDITOR = Rule(frozenset({ADMIN, AUDITOR}))
_READ_RESOURCE = Rule(frozenset({ADMIN, DATA_PLANE, AUDITOR}))
_DATA = Rule(frozenset({DATA_PLANE}))
_DATA_DEFERRED = Rule(frozenset({DATA_PLANE}), deferred=True)
_AUDITOR = Rule(frozenset({AUDITOR}))

_KB = "/keybroker.v1.KeyBroker/"
_ST = "/keybroker.v1.Storage/"
METHOD_RULES: Mapping[str, Rule] = {
    # Resources and their keys: admin. Reads of a resource's state are open to every role (the
    # workers' sweeper and jobs read it; it holds no key material).
    _KB + "CreateResource": _ADMIN,
    _KB + "ImportResource": _ADMIN,
    _KB + "GetResource": _READ_RESOURCE,
    _KB + "ListResources": _ADMIN_OR_AUDITOR,
    _KB + "DeleteResource": _ADMIN,
    _KB + "UndeleteResource": _ADMIN,
    _KB + "EnableCustomerManagedKey": _ADMIN,
    _KB + "UpdateCustomerManagedKey": _ADMIN,
    _KB + "DisableCustomerManagedKey": _ADMIN,
    _KB + "RotateResourceKey": _ADMIN,
    _KB + "ListResourceKeyVersions": _ADMIN_OR_AUDITOR,
    _KB + "DestroyResourceKeyVersion": _ADMIN,
    _KB + "RestoreResourceKeyVersion": _ADMIN,
    # Data keys: data-plane.
    _KB + "GenerateDataKey": _DATA,
    _KB + "DecryptDataKey": _DATA,
    _KB + "RewrapDataKey": _DATA,
    _KB + "BatchGenerateDataKeys": _DATA,
    _KB + "BatchDecryptDataKeys": _DATA,
    _KB + "BatchRewrapDataKeys": _DATA,
    # The audit trail: auditor.
    _KB + "ListAuditRecords": _AUDITOR,
    # The workers' own records, written into the broker's chained trail: admin, which the
    # workers' identity holds (broker.cli.dev_certs.DEV_ROLES); a data-plane caller cannot write
    # records.
    _KB + "WriteAuditRecord": _ADMIN,
    _KB + "GetStatus": ANY,
    # Storage objects: data-plane; jobs: admin.
    _ST + "UploadModel": _DATA_DEFERRED,
    _ST + "DownloadModel": _DATA,
    _ST + "GetModel": _DATA,
    _ST + "ListModels": _DATA,
    _ST + "DeleteModel": _DATA,
    _ST + "CreateAnalyzeOperation": _DATA,
    _ST + "UpdateAnalyzeOperation": _DATA,
    _ST + "UploadAnalyzeResult": _DATA_DEFERRED,
    _ST + "GetAnalyzeOperation": _DATA,
    _ST + "DownloadAnalyzeResult": _DATA,
    _ST + "DeleteAnalyzeResult": _DATA,
    _ST + "StartRewrapJob": _ADMIN,
    _ST + "StartReencryptJob": _ADMIN,
    _ST + "GetJob": _ADMIN_DEFERRED,
    # Health and reflection: any authenticated caller.
    "/grpc.health.v1.Health/Check": ANY,
    "/grpc.health.v1.Health/Watch": ANY,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": ANY,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": ANY,
}

# The limited grant of the current call (None: unlimited, or no policy). Each RPC runs in a task
# of its own, and detached work copies the context, so the value never leaks between calls.
_LIMITED_GRANT: ContextVar[Grant | None] = ContextVar("keybroker_limited_grant", default=None)
_RESOURCE_PREFIX = re.compile(r"resources/([^/]{1,63})(?:/|$)")
_NAME_FIELDS = ("name", "parent", "model", "resource")


def _resource_not_permitted(resource_id: str | None = None) -> PermissionDenied:
    return PermissionDenied(
        RESOURCE_NOT_PERMITTED,
        "the caller's grant does not cover this resource",
        f"resources/{resource_id}" if resource_id else None,
    )


def resource_id_of(name: str) -> str | None:
    """The resource id a name starts with (`resources/{id}...`), or None."""
    m = _RESOURCE_PREFIX.match(name)
    if m is None or not RESOURCE_ID_RE.fullmatch(m.group(1)):
        return None
    return m.group(1)


def check_resource(resource_id: str) -> None:
    """For handlers of deferred rules: refuses a resource outside the current call's grant."""
    grant = _LIMITED_GRANT.get()
    if grant is not None and not grant.covers(resource_id):
        parsed = RESOURCE_ID_RE.fullmatch(resource_id) is not None
        raise _resource_not_permitted(resource_id if parsed else None)


def check_name(name: str) -> None:
    """`check_resource` for a resource or object name; a limited grant refuses a name that does
    not parse (fail closed)."""
    grant = _LIMITED_GRANT.get()
    if grant is None:
        return
    resource_id = resource_id_of(name)
    if resource_id is None or not grant.covers(resource_id):
        raise _resource_not_permitted(resource_id)


def _named_resources(request: Any) -> list[str | None]:
    """The resource ids a request names (None for a name that does not parse)."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None:
        return []  # not a protobuf message (a raw-bytes method): it names nothing we know
    fields = descriptor.fields_by_name
    out: list[str | None] = []
    if "resource_id" in fields and request.resource_id:
        rid = request.resource_id
        out.append(rid if RESOURCE_ID_RE.fullmatch(rid) else None)
    for field in _NAME_FIELDS:
        if field in fields:
            value = getattr(request, field)
            if isinstance(value, str) and value:
                out.append(resource_id_of(value))
    if "requests" in fields:
        for item in request.requests:
            out.append(resource_id_of(getattr(item, "name", "")))
    return out


class _Gate:
    """The check of one method (see the module docstring)."""

    def __init__(self, method: str, rule: Rule | None, policy: Policy, record: Record) -> None:
        self.method = method
        self.operation = method.rsplit("/", 1)[-1]
        self.rule = rule
        self.policy = policy
        self.record = record

    async def admit(self, context: Context, request: Any) -> None:
        """Returns if the call may go on; else audits the refusal and raises PermissionDenied."""
        rule = self.rule
        grant = self.policy.grant(caller(context))
        if rule is None or (
            rule.roles is not None and (grant is None or grant.roles.isdisjoint(rule.roles))
        ):
            raise await self.denied(
                context,
                PermissionDenied(
                    PERMISSION_DENIED, f"the caller's grant does not allow {self.operation}"
                ),
                request,
            )
        limited = grant is not None and grant.resources is not None
        if limited:
            _LIMITED_GRANT.set(grant)
        if rule.deferred or not (limited or grant is None):
            return
        # A stream of requests (not deferred) names nothing the interceptor can see: a limited
        # grant is then refused below, as for a call that names no resource.
        named = _named_resources(request) if request is not None else []
        if named:
            if grant is None or not all(r is not None and grant.covers(r) for r in named):
                raise await self.denied(context, _resource_not_permitted(), request)
        elif limited and rule.roles is not None:
            # A limited grant cannot be checked against a call that names no resource.
            raise await self.denied(context, _resource_not_permitted(), request)

    async def denied(
        self, context: Context, error: PermissionDenied, request: Any
    ) -> PermissionDenied:
        """Audits a refusal; returns the error to raise."""
        identity, on_behalf_of, request_id = call_identity(context)
        event = AuditEvent(self.operation, identity, request_id, on_behalf_of)
        event.outcome, event.reason = error.code.name, error.reason
        event.resource = error.resource
        if request is not None:
            named = set(_named_resources(request))
            if len(named) == 1 and None not in named:
                # Only a name that parsed goes into the trail (see broker.service).
                event.resource = f"resources/{named.pop()}"
        await self.record(event)
        return error


class AuthzInterceptor(WrappingInterceptor):
    """Checks every call against `policy` (see the module docstring); `record` audits refusals."""

    def __init__(
        self, policy: Policy, record: Record, rules: Mapping[str, Rule] = METHOD_RULES
    ) -> None:
        super().__init__()
        self._policy = policy
        self._record = record
        self._rules = rules

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        gate = _Gate(method, self._rules.get(method), self._policy, self._record)
        return rebuild(
            handler,
            lambda inner, requests_stream: _gated_call(inner, gate, requests_stream),
            lambda inner, requests_stream: _gated_stream(inner, gate, requests_stream),
        )


# A PermissionDenied raised by a handler (a deferred check) is audited here, on its way out.
# A stream of requests shows the gate nothing to check before the handler reads it (None).


def _gated_call(inner: Any, gate: _Gate, requests_stream: bool) -> Any:
    async def call(request: Any, context: Context) -> Any:
        seen = None if requests_stream else request
        await gate.admit(context, seen)
        try:
            return await inner(request, context)
        except PermissionDenied as exc:
            raise await gate.denied(context, exc, seen) from None

    return call


def _gated_stream(inner: Any, gate: _Gate, requests_stream: bool) -> Any:
    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        seen = None if requests_stream else request
        await gate.admit(context, seen)
        try:
            async for item in inner(request, context):
                yield item
        except PermissionDenied as exc:
            raise await gate.denied(context, exc, seen) from None

    return stream


def authz_interceptors(settings: Settings, record: Record) -> list[grpc.aio.ServerInterceptor]:
    """The authorization interceptor when the settings name a policy file (read here, once; a
    bad file stops the start), else none. Goes after ErrorInterceptor in a server's list."""
    if not settings.policy_file:
        return []
    return [AuthzInterceptor(load_policy(Path(settings.policy_file)), record)]
