"""Who is calling: the caller's identity, the end caller it acts for, and the request id.

Until mutual TLS lands the caller is the transport peer (loopback address and port); the end
caller comes from the `keybroker-on-behalf-of` metadata a worker sets, and is recorded, not trusted.
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


def call_identity(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str | None, str]:
    """(caller, on_behalf_of, request_id) of the current call."""
    on_behalf_of = None
    request_id = None
    for key, value in context.invocation_metadata() or ():
        if key == ON_BEHALF_OF_KEY and isinstance(value, str):
            on_behalf_of = value[:_MAX_LENGTH]
        elif key == REQUEST_ID_KEY and isinstance(value, str):
            request_id = value[:64]
    return context.peer()[:_MAX_LENGTH], on_behalf_of, request_id or f"{_PREFIX}-{next(_COUNTER)}"
