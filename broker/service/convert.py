"""KeyBroker rows to keybroker.v1 messages, and the request fields only KeyBroker takes (pending
windows, creation times)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from broker.api import key_broker_pb2 as pb
from broker.core.errors import InvalidArgument
from broker.core.names import Purpose, key_version_name, resource_name
from broker.db.tables import CustomerKeyRow, KeyRingRow, KeyVersionRow, ResourceRow
from broker.rpc.fields import timestamp

PURPOSES = {Purpose.MODELS: pb.MODELS, Purpose.RESULTS: pb.RESULTS}
_KEY_SOURCES = {"service_managed": pb.SERVICE_MANAGED, "customer_managed": pb.CUSTOMER_MANAGED}
_RESOURCE_STATES = {
    "active": pb.Resource.ACTIVE,
    "delete_scheduled": pb.Resource.DELETE_SCHEDULED,
    "destroyed": pb.Resource.DESTROYED,
}
_VERSION_STATES = {
    "enabled": pb.ResourceKeyVersion.ENABLED,
    "destroy_scheduled": pb.ResourceKeyVersion.DESTROY_SCHEDULED,
    "destroyed": pb.ResourceKeyVersion.DESTROYED,
}


def purpose_encryption(ring: KeyRingRow) -> pb.PurposeEncryption:
    purpose = Purpose(ring.purpose)
    return pb.PurposeEncryption(
        purpose=PURPOSES[purpose],
        key_source=_KEY_SOURCES[ring.key_source],
        root_key_id=ring.root_key_id,
        current_key_version=key_version_name(ring.resource_id, purpose, ring.current_version),
        next_rotation_time=timestamp(ring.rotation_time),
    )


def customer_managed_key(row: CustomerKeyRow) -> pb.CustomerManagedKey:
    reference = pb.CustomerKeyReference(
        provider=row.provider,
        vault=row.vault,
        key_name=row.key_name,
        version=row.version,
        identity=row.identity,
    )
    return pb.CustomerManagedKey(
        key=reference,
        follow_latest=row.follow_latest,
        key_id=f"{row.provider}:{row.vault}/{row.key_name}/{row.version}",
        scope=[PURPOSES[Purpose(p)] for p in row.scope.split(",")],
        enable_time=timestamp(row.enable_time),
    )


def resource(
    row: ResourceRow,
    rings: list[KeyRingRow] | tuple[KeyRingRow, ...],
    customer_key: CustomerKeyRow | None = None,
) -> pb.Resource:
    message = pb.Resource(
        name=resource_name(row.id),
        create_time=timestamp(row.create_time),
        state=_RESOURCE_STATES[row.state],
        imported=row.imported,
    )
    if row.purge_time is not None and row.state == "delete_scheduled":
        message.purge_time.CopyFrom(timestamp(row.purge_time))
    if row.destroy_time is not None:
        message.destroy_time.CopyFrom(timestamp(row.destroy_time))
    if row.state != "destroyed":
        message.encryption.extend(purpose_encryption(r) for r in rings)
    if customer_key is not None:
        message.customer_managed_key.CopyFrom(customer_managed_key(customer_key))
    return message


def key_version(row: KeyVersionRow, current_version: int) -> pb.ResourceKeyVersion:
    purpose = Purpose(row.purpose)
    message = pb.ResourceKeyVersion(
        name=key_version_name(row.resource_id, purpose, row.version),
        purpose=PURPOSES[purpose],
        version=row.version,
        state=_VERSION_STATES[row.state],
        current=row.version == current_version,
        create_time=timestamp(row.create_time),
        root_key_id=row.root_key_id or "",
    )
    if row.destroy_time is not None:
        message.destroy_time.CopyFrom(timestamp(row.destroy_time))
    if row.destroy_event_time is not None:
        message.destroy_event_time.CopyFrom(timestamp(row.destroy_event_time))
    return message


def pending_window(has_value: bool, value: Duration) -> timedelta | None:
    """An optional Duration field: None when unset."""
    if not has_value:
        return None
    if value.seconds < 0 or value.nanos < 0 or value.seconds > 10 * 365 * 86400:
        raise InvalidArgument("INVALID_PENDING_WINDOW", "pending_window is out of range")
    return value.ToTimedelta()


def create_time(value: Timestamp) -> datetime:
    # Timestamp's valid range is years 1-9999; out of it, conversion raises.
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument("INVALID_CREATE_TIME", "create_time is out of range") from None
