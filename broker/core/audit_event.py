"""The audit event: the facts of one answered call or state change, as every layer reports them.

The audit trail that stores and chains them is broker.audit; the workers send theirs to the broker
(WriteAuditRecord). Here, in the core layer, so that both can name the type without importing the
trail itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(slots=True)
class AuditEvent:
    """The facts of one call or change. Handlers fill in resource, key ids and counts as they go."""

    operation: str
    caller: str
    request_id: str
    on_behalf_of: str | None = None
    resource: str | None = None
    item_count: int = 1
    failed_count: int = 0
    key_ids: set[str] = field(default_factory=set)
    outcome: str = "OK"
    reason: str | None = None

    def row(self, writer: str, now: datetime) -> tuple[Any, ...]:
        """The record's content, in broker.audit.chain.CONTENT_COLUMNS order."""
        return (
            now,
            writer,
            self.request_id,
            self.caller,
            self.on_behalf_of,
            self.operation,
            self.resource,
            self.item_count,
            self.failed_count,
            " ".join(sorted(self.key_ids)),
            self.outcome,
            self.reason,
        )
