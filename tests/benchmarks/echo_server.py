"""The baselines for the unary benchmark: the KeyBroker service answering with fixed replies, with
no crypto, no cache and no audit.

- DecryptDataKey: a fixed reply of the same size at once: gRPC's own per-call cost.
- GenerateDataKey: the same, but only after waiting, as the broker's calls wait for their audit
  group, for a shared "group" that completes GROUP_SECONDS after it opened (a timer: no I/O and no
  CPU). It prices what gRPC charges a handler for suspending once per call.

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
_GENERATED = pb.GenerateDataKeyResponse(
    plaintext_data_key=bytes(32), key_id="resources/bench/resourceKeys/models/versions/1"
)
GROUP_SECONDS = 0.001
"""About what one SQLite group commit of the audit trail takes here."""


class EchoBroker(pb_grpc.KeyBrokerServicer):
    async def DecryptDataKey(
        self, request: pb.DecryptDataKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DecryptDataKeyResponse:
        return _REPLY

    def __init__(self) -> None:
        self._group: asyncio.Future[None] | None = None

    async def GenerateDataKey(
        self, request: pb.GenerateDataKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateDataKeyResponse:
        group = self._group
        if group is None:
            loop = asyncio.get_running_loop()
            group = self._group = loop.create_future()
            loop.call_later(GROUP_SECONDS, self._complete, group)
        await asyncio.shield(group)  # as broker.audit.AuditLog.record waits
        return _GENERATED

    def _complete(self, group: asyncio.Future[None]) -> None:
        self._group = None
        group.set_result(None)


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
