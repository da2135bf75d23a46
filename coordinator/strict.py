"""Registers a service so that a request that is not valid protobuf gets INVALID_ARGUMENT.

grpcio parses requests before the servicer runs and answers a parse failure with
UNKNOWN. Here each unary-request method receives the raw bytes and parses them itself,
so a malformed request is rejected with a status that says what was wrong.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor, message, message_factory


async def _parse(raw: bytes, request_class, context: grpc.aio.ServicerContext):
    try:
        return request_class.FromString(raw)
    except message.DecodeError as error:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {request_class.DESCRIPTOR.full_name}: {error}"
        )


def _serialize(response) -> bytes:
    return response.SerializeToString()


def _handler(method: descriptor.MethodDescriptor, behavior):
    request_class = message_factory.GetMessageClass(method.input_type)
    if method.server_streaming:

        async def stream(raw: bytes, context):
            request = await _parse(raw, request_class, context)
            async for response in behavior(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=None, response_serializer=_serialize)

    async def unary(raw: bytes, context):
        return await behavior(await _parse(raw, request_class, context), context)

    return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=None, response_serializer=_serialize)


def add_strict_service(server: grpc.aio.Server, service: descriptor.ServiceDescriptor, servicer) -> None:
    """Adds `servicer`'s methods of `service` (all of which take one request message) to `server`."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{service.full_name}/{method.name} streams requests; register it the usual way")
        handlers[method.name] = _handler(method, getattr(servicer, method.name))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
