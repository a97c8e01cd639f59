"""Where the workers' audit records go: always into the broker's chained trail.

The workers write records of their own (the retention sweep's ExpireAnalyzeResults and
PurgeResourceObjects, and Storage calls their authorization refused) but never hold the master
key, so they cannot chain a record themselves. Two implementations of `AuditRecorder`:

- `keybroker up`: the broker's own `broker.audit.AuditLog` (same process; its `record` has this
  very shape), so records join its group chain directly;
- `keybroker workers`: `BrokerAuditRecorder`, which sends each record to the broker
  (KeyBroker.WriteAuditRecord through workers.broker_client). The broker records the workers'
  authenticated identity as the caller, and `event.caller` (the identity the workers attribute
  the record to: the end caller Storage authenticated, or the background task's name) as
  on_behalf_of.

Either way `record` returns only once the record is durable, and raises (a KeybrokerError) when
it cannot be written: a refused Storage call then fails UNAVAILABLE rather than go unaudited.
"""

from __future__ import annotations

from typing import Protocol

from broker.core.audit_event import AuditEvent
from workers.broker_client import BrokerClient


class AuditRecorder(Protocol):
    """Writes one audit record durably (see the module docstring)."""

    async def record(self, event: AuditEvent) -> None:
        """Returns once the record of `event` is durable; raises a KeybrokerError if it cannot
        be written. Only operation, resource, item_count, outcome, reason, caller and
        request_id of a workers' event are kept (they set no key ids or failed counts)."""
        ...


class BrokerAuditRecorder:
    """An AuditRecorder that hands each record to the broker (`keybroker workers`)."""

    def __init__(self, broker: BrokerClient) -> None:
        self._broker = broker

    async def record(self, event: AuditEvent) -> None:
        await self._broker.write_audit_record(event)
