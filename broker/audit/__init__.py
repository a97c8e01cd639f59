"""The audit trail: log (group commit and state-change records), chain (the tamper-evident HMAC
chains and their checkpoints), sinks (where grouped records are written), reading (the
ListAuditRecords pages) and verify (`keybroker audit verify`). The event type itself is
broker.core.audit_event, so that layers below can report events without importing the trail.
"""

from broker.audit.log import AuditLog

__all__ = ["AuditLog"]
