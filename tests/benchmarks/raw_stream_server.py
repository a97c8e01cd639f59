"""The baseline for the streaming benchmark: bare grpc.aio with the two shapes of Storage's
UploadModel and DownloadModel, on raw bytes (no protobuf, no crypto, no disk): gRPC's own cost of
streaming the same bytes in the same chunks.

- Upload (client streaming): the first message is a header (ignored), the others are chunks; the
  reply is the number of chunk bytes received, as decimal ASCII.
- Download (server streaming): the request is a byte count N in decimal ASCII; the first reply is
  a short metadata message, then N bytes follow in 1 MiB chunks (one buffer sent again and again).

Generic handlers with no (de)serializers: gRPC hands the bytes through unchanged, so no proto.

Run: python -m tests.benchmarks.raw_stream_server PORT
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

from tests.benchmarks.common import add_baseline_port

SERVICE = "keybroker.bench.RawStream"
UPLOAD = f"/{SERVICE}/Upload"
DOWNLOAD = f"/{SERVICE}/Download"
CHUNK = 1 << 20
_PAYLOAD = os.urandom(CHUNK)


async def upload(requests: AsyncIterator[bytes], context: Any) -> bytes:
    received = -1  # the header does not count
    total = 0
    async for message in requests:
        received += 1
        if received:
            total += len(message)
    return str(total).encode()


async def download(request: bytes, context: Any) -> AsyncIterator[bytes]:
    size = int(request)
    yield b"metadata:" + request
    while size > 0:
        yield _PAYLOAD if size >= CHUNK else _PAYLOAD[:size]
        size -= CHUNK


def handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            # None as (de)serializer: the identity, bytes in and out.
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
            "Download": grpc.unary_stream_rpc_method_handler(download),
        },
    )


async def main(port: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler(),))
    add_baseline_port(server, f"127.0.0.1:{port}")  # mTLS when the run uses it
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
