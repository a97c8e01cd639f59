"""Limits on what one call may ask of a server, as named constants.

What exceeds a limit is refused before any work is done (INVALID_ARGUMENT for a field or a batch
that is too large, RESOURCE_EXHAUSTED for a message too large or too many open streams), never
with a crash or an allocation the caller controls:

- message size: `MAX_MESSAGE_BYTES` in both directions, as gRPC channel options
  (broker.rpc.grpc_server.server_options); gRPC rejects a larger message with
  RESOURCE_EXHAUSTED before it is decoded, so a handler never sees it;
- field sizes: names (`MAX_NAME_LENGTH`, checked by broker.core.names wherever a name is parsed,
  in KeyBroker and Storage alike), associated data, wrapped keys, batch items;
- open Storage streams (uploads and downloads) per caller: `MAX_STREAMS_PER_CALLER`
  (broker.rpc.stream_limits), RESOURCE_EXHAUSTED reason TOO_MANY_STREAMS;
- time: `MAX_UNARY_SECONDS` and `MAX_STREAM_SECONDS` (broker.rpc.deadlines), DEADLINE_EXCEEDED
  reason SERVER_DEADLINE_EXCEEDED.
"""

from __future__ import annotations

MAX_NAME_LENGTH = 256
"""Longest resource or object name accepted, in characters."""

MAX_ASSOCIATED_DATA_LENGTH = 4096
"""Longest caller-supplied associated_data, in bytes."""

MAX_WRAPPED_KEY_LENGTH = 1024
"""Longest wrapped data key accepted; real ones are far shorter (broker.keys.data_key_format)."""

MAX_BATCH_SIZE = 1000
"""Most items in one Batch*DataKeys request."""

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

MAX_MESSAGE_BYTES = 8 << 20
"""Largest gRPC message a server receives or sends, in bytes (gRPC's default receive limit is
4 MiB and its send limit unbounded; both are set here on purpose). The largest legitimate request
is a full batch: MAX_BATCH_SIZE items of a name, associated data and a wrapped key at their
limits, about 5.4 MB with framing; Storage chunks are about 1 MiB (the segment size)."""

MAX_STREAMS_PER_CALLER = 32
"""Most Storage uploads and downloads one caller may have open at once. Each holds a few
segments (about 1 MiB each) in memory, so one caller can pin about 100 MiB at most; without mutual
TLS every connection from one host counts as the same caller (caller_key)."""

MAX_UNARY_SECONDS = 30.0
"""Longest a unary call runs when its caller set no earlier deadline."""

MAX_STREAM_SECONDS = 3600.0
"""Longest a streaming call (an upload or a download) runs when its caller set no earlier
deadline: an hour moves tens of gigabytes at the rates measured here."""
