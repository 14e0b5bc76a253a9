"""gRPC server reflection, v1 (what grpcurl and newer clients ask first) as well as v1alpha, on the tiers'
servers and the router's grpc.aio server: a real reflection client lists the services and resolves the
InferenceService's methods and messages from the server alone."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.conftest import COMMITTED_MODELS
from tierline.build.engines import load_engine
from tierline_shared.serving.servicer import TierServicer
from tierline_shared.transport.grpc_server import REFLECTION_V1, add_health_and_reflection, create_server

TIMEOUT = 30  # seconds
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
EXPECTED = {"tierline.v1.InferenceService", "grpc.health.v1.Health", V1ALPHA, REFLECTION_V1}


class _Stub:
    """A reflection stub speaking the given version: v1's messages are v1alpha's, only the method's path differs."""

    def __init__(self, channel: grpc.Channel, service: str):
        self.ServerReflectionInfo = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)


def reflect(port: int, service: str) -> tuple[set[str], list[str]]:
    """(the services the server lists, the InferenceService's methods with their input types), via `service`."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        db = ProtoReflectionDescriptorDatabase(channel)
        db._stub = _Stub(channel, service)  # the client's own logic, over the version under test
        services = set(db.get_services())
        svc = DescriptorPool(db).FindServiceByName("tierline.v1.InferenceService")
        return services, sorted(f"{m.name}({m.input_type.full_name})" for m in svc.methods)


METHODS = ["GetServerInfo(tierline.v1.ServerInfoRequest)", "GetStatus(tierline.v1.StatusRequest)",
           "Infer(tierline.v1.InferRequest)", "InferStream(tierline.v1.InferRequest)"]


@pytest.fixture(scope="module")
def tier_port():
    servicer = TierServicer(load_engine(COMMITTED_MODELS, "edge", threads=1))
    server, port = create_server(servicer, port=0)
    server.start()
    yield port
    server.stop(grace=None)
    servicer.scheduler.close()


@pytest.mark.parametrize("service", [REFLECTION_V1, V1ALPHA])
def test_a_tier_answers_reflection(tier_port, service):
    services, methods = reflect(tier_port, service)
    assert services == EXPECTED and methods == METHODS


@pytest.mark.parametrize("service", [REFLECTION_V1, V1ALPHA])
def test_the_routers_aio_server_answers_reflection(service):
    ready, done, port = threading.Event(), None, []

    async def serve() -> None:
        nonlocal done
        server = grpc.aio.server()
        add_health_and_reflection(server, aio=True)
        port.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        done = asyncio.Event()
        ready.set()
        await done.wait()
        await server.stop(grace=None)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(TIMEOUT)
    try:
        services, _ = reflect(port[0], service)
        assert services == EXPECTED
    finally:
        loop.call_soon_threadsafe(done.set)
        thread.join(TIMEOUT)
