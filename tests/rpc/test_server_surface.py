"""What load balancers, grpcurl and operators see: health, reflection, and GetStatus counters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from broker.api import key_broker_pb2 as pb
from tests.harness import BrokerUnderTest

MODEL = "resources/r1/models/m1"


@pytest.mark.asyncio
async def test_health_reports_serving(broker: BrokerUnderTest) -> None:
    stub: Any = health_pb2_grpc.HealthStub(broker.channel)
    for service in ("", "keybroker.v1.KeyBroker"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.asyncio
async def test_reflection_lists_the_services(broker: BrokerUnderTest) -> None:
    channel: Any = broker.channel  # the typeshed stub types only the sync Channel
    stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def one_request() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for reply in stub.ServerReflectionInfo(one_request()):
        names |= {s.name for s in reply.list_services_response.service}
    assert {"keybroker.v1.KeyBroker", "grpc.health.v1.Health"} <= names


@pytest.mark.asyncio
async def test_status_counts_cache_hits_misses_and_root_key_calls(broker: BrokerUnderTest) -> None:
    await broker.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    key = await broker.stub.GenerateDataKey(pb.GenerateDataKeyRequest(name=MODEL))
    broker.running.broker.keys.cache.clear()
    before = (await broker.stub.GetStatus(pb.GetStatusRequest())).key_cache
    request = pb.DecryptDataKeyRequest(name=MODEL, wrapped_data_key=key.wrapped_data_key)
    for _ in range(20):
        await broker.stub.DecryptDataKey(request)
    after = (await broker.stub.GetStatus(pb.GetStatusRequest())).key_cache
    assert after.root_key_calls - before.root_key_calls == 1
    assert after.misses - before.misses == 1
    assert after.hits - before.hits == 19
    assert after.entries == 1
    assert after.root_key_failures == 0
