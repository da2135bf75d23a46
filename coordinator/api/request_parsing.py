"""Registers a service so that a request that is not valid protobuf gets INVALID_ARGUMENT.

grpcio parses requests before the servicer runs and answers a parse failure with
UNKNOWN ("Unexpected DecodeError"), which tells a client nothing it can act on. Here
every method is registered without a request deserializer: it receives raw bytes,
and this module parses them, so a malformed request is rejected with INVALID_ARGUMENT
and a message naming the expected type. Servicers, including stock ones (health,
reflection), keep receiving parsed messages:

- one-request methods get the parsed request;
- request-streaming methods get an async iterator of parsed requests, and a context
  whose `read()` returns parsed requests, whichever of the two they consume.
"""

from __future__ import annotations

import inspect
from typing import Any

import grpc
from google.protobuf import descriptor, message, message_factory


class MalformedRequest(Exception):
    """A request (or one message of a request stream) is not valid protobuf; the text says which and why.

    Raised by the parsing this module puts in front of a servicer; when it escapes the
    servicer, the call ends INVALID_ARGUMENT with its text. A servicer that reads a
    stream in a task of its own must catch it there and end the call itself.
    """


def _serialize(response) -> bytes:
    return response.SerializeToString()


def _decode_error_reason(error: message.DecodeError, request_class) -> str:
    """The DecodeError's reason without its "Error parsing message with type 'X': " prefix, as X is named anyway."""
    return str(error).removeprefix(f"Error parsing message with type '{request_class.DESCRIPTOR.full_name}': ")


def parse_request(raw: bytes, request_class, what: str = "request"):
    """`raw` parsed as `request_class`; MalformedRequest naming `what` and the type if it is not one."""
    try:
        return request_class.FromString(raw)
    except message.DecodeError as error:
        raise MalformedRequest(
            f"{what} is not a valid {request_class.DESCRIPTOR.full_name}: {_decode_error_reason(error, request_class)}"
        ) from None


class _RequestStream:
    """The requests of one request-streaming call, parsed as they arrive and numbered for error messages."""

    def __init__(self, request_class, context: grpc.aio.ServicerContext) -> None:
        self.request_class = request_class
        self.received = 0
        self.context = _ParsingContext(context, self)

    def parse(self, raw: bytes):
        self.received += 1
        return parse_request(raw, self.request_class, f"message {self.received} of the request stream")

    async def requests(self, raw_requests):
        async for raw in raw_requests:
            yield self.parse(raw)


class _ParsingContext:
    """The call's context, except that `read()` returns parsed requests instead of raw bytes."""

    def __init__(self, context: grpc.aio.ServicerContext, stream: _RequestStream) -> None:
        self._context = context
        self._stream = stream

    async def read(self):
        raw = await self._context.read()
        return raw if raw is grpc.aio.EOF else self._stream.parse(raw)

    def __getattr__(self, name):
        return getattr(self._context, name)


_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _handler(method: descriptor.MethodDescriptor, behavior) -> grpc.RpcMethodHandler:
    request_class = message_factory.GetMessageClass(method.input_type)

    def arguments(request, context) -> tuple:
        """What `behavior` is called with: the raw request (or stream of them) parsed."""
        if method.client_streaming:
            stream = _RequestStream(request_class, context)
            return stream.requests(request), stream.context
        return parse_request(request, request_class), context

    # The wrapper must be of the same kind as the servicer method (async generator, or
    # coroutine that writes through its context), as grpcio and the metrics interceptor
    # tell the two apart.
    if inspect.isasyncgenfunction(behavior):

        async def handle(request, context):
            try:
                async for response in behavior(*arguments(request, context)):
                    yield response
            except MalformedRequest as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

        make = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
        return make(handle, request_deserializer=None, response_serializer=_serialize)

    async def handle_unary(request, context):
        try:
            return await behavior(*arguments(request, context))
        except MalformedRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    make = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
    return make(handle_unary, request_deserializer=None, response_serializer=_serialize)


def add_strict_service(server: grpc.aio.Server, service: Any, servicer: Any) -> None:
    """Adds `servicer`'s methods of `service` to `server`, with requests parsed as described above."""
    handlers = {method.name: _handler(method, getattr(servicer, method.name)) for method in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
