"""Who is calling: the caller's identity, the end caller it acts for, and the request id.

With mutual TLS the caller is its client certificate's SAN URI (e.g.
spiffe://keybroker.local/app), else its first SAN DNS name, else `subject:` and its subject DN;
the TLS handshake has already checked the certificate against the configured CA, so no handler
ever runs for a caller without one. Without TLS (loopback only, see Settings.check_listen) the
caller is the transport peer (address and port). The end caller comes from the
`keybroker-on-behalf-of` metadata a worker sets, and is recorded, not trusted.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import grpc

ON_BEHALF_OF_KEY = "keybroker-on-behalf-of"
REQUEST_ID_KEY = "x-request-id"
_MAX_LENGTH = 200
# Request ids made here: a per-process random prefix and a counter (uuid4 per call shows in
# profiles of the hot path; uniqueness is all an audit record needs).
_PREFIX = os.urandom(6).hex()
_COUNTER = itertools.count()


def caller(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The authenticated identity of the current call (see the module docstring)."""
    if context.peer_identities() is None:
        # No certificate (plain loopback TCP): a cheap check, since auth_context() builds a dict
        # per call and this runs on the hot path.
        return context.peer()[:_MAX_LENGTH]
    auth = context.auth_context()
    # gRPC's TLS layer files URI and DNS SANs under their own peer properties.
    names = auth.get("peer_uri") or auth.get("peer_dns") or ()
    for name in names:
        return name.decode("utf-8", "replace")[:_MAX_LENGTH]
    for subject in auth.get("x509_subject") or ():
        return f"subject:{subject.decode('utf-8', 'replace')}"[:_MAX_LENGTH]
    return context.peer()[:_MAX_LENGTH]


def call_identity(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str | None, str]:
    """(caller, on_behalf_of, request_id) of the current call."""
    on_behalf_of = None
    request_id = None
    for key, value in context.invocation_metadata() or ():
        if key == ON_BEHALF_OF_KEY and isinstance(value, str):
            on_behalf_of = value[:_MAX_LENGTH]
        elif key == REQUEST_ID_KEY and isinstance(value, str):
            request_id = value[:64]
    return caller(context), on_behalf_of, request_id or f"{_PREFIX}-{next(_COUNTER)}"
