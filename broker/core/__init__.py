"""The core layer: what every other layer, and the workers, share. Imports nothing of keybroker's
but the generated API.

errors (the error hierarchy and its gRPC statuses), names (resource names, AIP-122), identity (who
is calling), settings (read once into a frozen object), limits (named constants), audit_event (the
facts of one audited call), clock, detached (work that outlives its RPC), data_dir_lock.
"""

from broker.core.audit_event import AuditEvent
from broker.core.clock import Clock, utc_now
from broker.core.errors import ConfigurationError, KeybrokerError
from broker.core.settings import Settings

__all__ = ["AuditEvent", "Clock", "ConfigurationError", "KeybrokerError", "Settings", "utc_now"]
