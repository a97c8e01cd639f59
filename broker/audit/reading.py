"""Reading a resource's audit trail in pages (the ListAuditRecords RPC).

A resource's trail is every record whose `resource` is the resource itself (`resources/{r}`) or
one of its objects (`resources/{r}/...`). Records come oldest first, in id order (the order
they were written in), and a page resumes after the last id of the previous one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal, cast

from sqlalchemy import Row, Table, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.api import key_broker_pb2 as pb
from broker.core.errors import InvalidArgument
from broker.db.tables import AuditRow
from broker.rpc.fields import timestamp

_AUDIT = cast(Table, AuditRow.__table__)


async def page(
    engine: AsyncEngine,
    parent: str,
    *,
    after_id: int,
    start: datetime | None,
    end: datetime | None,
    limit: int,
) -> Sequence[Row[Any]]:
    """Up to `limit` records of `parent` (`resources/{r}`) with id > `after_id`, within
    [start, end) when given, in id order."""
    c = AuditRow
    # LIKE 'parent/%' (escaped), not a range: a range on text depends on the collation.
    in_trail = or_(c.resource == parent, c.resource.startswith(parent + "/", autoescape=True))
    query = select(*_AUDIT.columns).where(in_trail, c.id > after_id)
    if start is not None:
        query = query.where(c.time >= start)
    if end is not None:
        query = query.where(c.time < end)
    async with engine.connect() as conn:
        result = await conn.execute(query.order_by(c.id).limit(limit))
        return result.all()


def time_bound(
    request: pb.ListAuditRecordsRequest, field: Literal["start_time", "end_time"]
) -> datetime | None:
    """An optional Timestamp field of the request: None when unset."""
    if not request.HasField(field):
        return None
    try:
        return getattr(request, field).ToDatetime(tzinfo=UTC)  # type: ignore[no-any-return]
    except (ValueError, OverflowError):
        raise InvalidArgument("INVALID_TIME_RANGE", f"{field} is out of range") from None


def message(parent: str, row: Row[Any]) -> pb.AuditRecord:
    """A stored record as a keybroker.v1.AuditRecord named under `parent`."""
    return pb.AuditRecord(
        name=f"{parent}/auditRecords/{row.id}",
        time=timestamp(row.time),
        caller=row.caller,
        on_behalf_of=row.on_behalf_of or "",
        operation=row.operation,
        resource=row.resource or "",
        item_count=row.item_count,
        failed_count=row.failed_count,
        key_ids=row.key_ids.split(),
        outcome=row.outcome,
        reason=row.reason or "",
        request_id=row.request_id,
        writer=row.writer,
        chain_sequence=row.chain_seq or 0,
        chain_mac=row.chain_mac or b"",
    )
