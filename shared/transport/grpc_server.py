"""A gRPC server as every Tierline process runs it: the InferenceService, health and reflection, any port.

`create_server` binds a port (0 = any free one) and returns it apart from starting, so tests run
real servers on free ports; the router (grpc.aio) adds the same services with `add_inference_service`
and `add_health_and_reflection`. A request that is not the protobuf message a method takes is
answered INVALID_ARGUMENT naming the message, by every service (the generated code would answer UNKNOWN
or INTERNAL with a Python exception's name): each is added through `_add_lenient`.
"""

from __future__ import annotations

import hmac
import inspect
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"]
SERVICE_NAME = SERVICE.full_name
DEFAULT_WORKERS = 32  # gRPC handler threads (they mostly wait on the scheduler)
# gRPC sets SO_REUSEPORT by default: a second process would bind a port in use without an error and the two
# would share its connections silently. Every Tierline server binds its port alone.
SERVER_OPTIONS = [("grpc.so_reuseport", 0)]
# gRPC reflection v1 (grpcurl and newer clients ask it first): v1alpha's service under its final package name, the
# messages field for field the same. grpcio-reflection serves v1alpha only; its servicer answers v1 as well.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def add_health_and_reflection(server, aio: bool = False):
    """gRPC health and reflection beside the InferenceService, the same on every tier and the router.

    Returns the health servicer (`grpc.aio`'s for an aio server); `set_serving` marks
    every name a health check may ask about (the server, "", and the InferenceService).
    """
    health_servicer = health.aio.HealthServicer() if aio else health.HealthServicer()
    health_service = health_pb2.DESCRIPTOR.services_by_name["Health"]
    _add_lenient(server, health_servicer, health_service, aio)
    names = (SERVICE_NAME, health_service.full_name, reflection.SERVICE_NAME, REFLECTION_V1)
    reflecting = (reflection.aio.ReflectionServicer if aio else reflection.ReflectionServicer)(names)
    # v1alpha, and v1: the same servicer on v1's path (the bytes on the wire are the same messages)
    for name in (reflection.SERVICE_NAME, REFLECTION_V1):
        _add_lenient(server, reflecting, reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"], aio, name)
    return health_servicer


HEALTH_NAMES = ("", SERVICE_NAME)  # what a health check may name: the whole server, the InferenceService


def set_serving(health_servicer) -> None:
    for name in HEALTH_NAMES:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def set_serving_async(health_servicer) -> None:
    """`set_serving` for grpc.aio's health servicer, whose `set` is a coroutine."""
    for name in HEALTH_NAMES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


class BearerToken(grpc.ServerInterceptor):
    """Every InferenceService call must carry `authorization: Bearer <token>` (health and reflection stay
    open, so orchestrators can probe); anything else is UNAUTHENTICATED."""

    def __init__(self, token: str):
        if len(token) < 16:
            raise ValueError("the gRPC bearer token must have at least 16 characters")
        self._expected = f"Bearer {token}".encode()
        self._deny = {}
        for m in SERVICE.methods:
            make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
            self._deny[f"/{SERVICE_NAME}/{m.name}"] = make(self._refuse)

    @staticmethod
    def _refuse(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: a bearer token is required on this port")

    def intercept_service(self, continuation, details):
        deny = self._deny.get(details.method)
        if deny is None:
            return continuation(details)
        sent = next((v for k, v in details.invocation_metadata or () if k == "authorization"), "")
        sent = sent.encode() if isinstance(sent, str) else sent
        return continuation(details) if hmac.compare_digest(sent, self._expected) else deny


def create_server(servicer: pb_grpc.InferenceServiceServicer, host: str = "127.0.0.1", port: int = 0,
                  workers: int = DEFAULT_WORKERS, token: str = "") -> tuple[grpc.Server, int]:
    """A gRPC server with the InferenceService, health and reflection; not started yet. With `token`,
    InferenceService calls need it as a bearer token (`BearerToken`)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         interceptors=[BearerToken(token)] if token else None, options=SERVER_OPTIONS)
    add_inference_service(servicer, server)
    set_serving(add_health_and_reflection(server))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    return server, bound


class _Malformed:
    """What a request's bytes were when they were not its protobuf message."""

    def __init__(self, message: str):
        self.message = message


def _lenient(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError:
            return _Malformed(f"request: not a valid {message_cls.DESCRIPTOR.full_name} (protobuf)")
    return parse


def _guarded(behavior, streaming: bool, aio: bool, client_streaming: bool = False):
    """The servicer's method, answering INVALID_ARGUMENT for a request that could not be parsed (for a request
    stream: at the first such message). A grpc.aio streaming method is an async generator, or a coroutine that
    writes its responses with `context.write` (grpc.aio's health Watch): wrapped as what it is."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    yields = inspect.isasyncgenfunction(behavior)
    if client_streaming:
        inner = behavior
        if aio:
            def behavior(requests, context):
                async def checked():
                    async for request in requests:
                        if isinstance(request, _Malformed):
                            await context.abort(bad, request.message)
                        yield request
                return inner(checked(), context)
        else:
            def behavior(requests, context):
                def checked():
                    for request in requests:
                        if isinstance(request, _Malformed):
                            context.abort(bad, request.message)
                        yield request
                return inner(checked(), context)
    if aio and streaming and yields:
        async def method(request, context):
            if isinstance(request, _Malformed):
                await context.abort(bad, request.message)
            async for item in behavior(request, context):
                yield item
    elif aio:
        async def method(request, context):
            if isinstance(request, _Malformed):
                await context.abort(bad, request.message)
            return await behavior(request, context)
    elif streaming:
        def method(request, context):
            if isinstance(request, _Malformed):
                context.abort(bad, request.message)
            yield from behavior(request, context)
    else:
        def method(request, context):
            if isinstance(request, _Malformed):
                context.abort(bad, request.message)
            return behavior(request, context)
    return method


_HANDLERS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


def _add_lenient(server, servicer, service, aio: bool, name: str | None = None) -> None:
    """The methods of `service` (a protobuf ServiceDescriptor) that `servicer` has, on `server` (grpc or grpc.aio)
    under `name` (the service's own by default), every request parsed leniently (`_lenient`, `_guarded`)."""
    handlers = {}
    for m in service.methods:
        behavior = getattr(servicer, m.name, None)
        if behavior is None:  # a method the library's servicer does not implement (yet): UNIMPLEMENTED, as before
            continue
        make = _HANDLERS[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(_guarded(behavior, m.server_streaming, aio, m.client_streaming),
                                request_deserializer=_lenient(GetMessageClass(m.input_type)),
                                response_serializer=GetMessageClass(m.output_type).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name or service.full_name, handlers),))


def add_inference_service(servicer: pb_grpc.InferenceServiceServicer, server, aio: bool = False) -> None:
    """The InferenceService of `servicer` on `server` (grpc or grpc.aio), every request parsed leniently."""
    _add_lenient(server, servicer, SERVICE, aio)
