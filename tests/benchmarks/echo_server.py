"""The baseline for the unary benchmark: the KeyBroker service answering DecryptDataKey with a
fixed reply of the same size, with no crypto, no cache and no audit: gRPC's own per-call cost.

Run: python -m tests.benchmarks.echo_server PORT
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc

from broker.api import key_broker_pb2 as pb
from broker.api import key_broker_pb2_grpc as pb_grpc
from tests.benchmarks.common import add_baseline_port

_REPLY = pb.DecryptDataKeyResponse(
    plaintext_data_key=bytes(32), key_id="resources/bench/resourceKeys/models/versions/1"
)


class EchoBroker(pb_grpc.KeyBrokerServicer):
    async def DecryptDataKey(
        self, request: pb.DecryptDataKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DecryptDataKeyResponse:
        return _REPLY


async def main(port: int) -> None:
    server = grpc.aio.server()
    # Only DecryptDataKey is called; the other abstract methods are never reached.
    pb_grpc.add_KeyBrokerServicer_to_server(EchoBroker(), server)  # type: ignore[abstract]
    add_baseline_port(server, f"127.0.0.1:{port}")  # mTLS when the run uses it
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
