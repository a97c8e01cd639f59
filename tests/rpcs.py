"""Every RPC of keybroker.v1, from the service descriptors, and a way to call any of them.

Tests that must cover every RPC iterate `all_methods()` rather than a list of names, so a new RPC
is covered (or makes them fail naming it) without anyone remembering to add it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from broker.api import key_broker_pb2 as pb
from broker.api import storage_pb2 as spb

SERVICES = (
    pb.DESCRIPTOR.services_by_name["KeyBroker"],
    spb.DESCRIPTOR.services_by_name["Storage"],
)


@dataclass(frozen=True)
class Rpc:
    """One RPC: its descriptor, its full path, and its request and response classes."""

    method: MethodDescriptor
    path: str
    request: type[Message]
    response: type[Message]

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def service(self) -> str:
        return self.method.containing_service.name

    @property
    def client_streaming(self) -> bool:
        return bool(self.method.client_streaming)

    @property
    def server_streaming(self) -> bool:
        return bool(self.method.server_streaming)


def all_methods() -> list[Rpc]:
    """Every RPC of KeyBroker and Storage, in declaration order."""
    return [
        Rpc(
            m,
            f"/{service.full_name}/{m.name}",
            message_factory.GetMessageClass(m.input_type),
            message_factory.GetMessageClass(m.output_type),
        )
        for service in SERVICES
        for m in service.methods
    ]


async def call(
    channel: grpc.aio.Channel, rpc: Rpc, requests: Sequence[Message], deadline: float
) -> list[Message]:
    """Calls `rpc` with `requests` (exactly one unless it is client-streaming) under a gRPC
    deadline of `deadline` seconds, and returns every response (one unless it is
    server-streaming). Raises grpc.aio.AioRpcError on a non-OK status."""
    serialize = rpc.request.SerializeToString
    deserialize = rpc.response.FromString
    if rpc.client_streaming:

        async def stream() -> AsyncIterator[Message]:
            for r in requests:
                yield r

        if rpc.server_streaming:
            ss: Any = channel.stream_stream(rpc.path, serialize, deserialize)
            return [m async for m in ss(stream(), timeout=deadline)]
        su: Any = channel.stream_unary(rpc.path, serialize, deserialize)
        return [await su(stream(), timeout=deadline)]
    (request,) = requests
    if rpc.server_streaming:
        us: Any = channel.unary_stream(rpc.path, serialize, deserialize)
        return [m async for m in us(request, timeout=deadline)]
    uu: Any = channel.unary_unary(rpc.path, serialize, deserialize)
    return [await uu(request, timeout=deadline)]
