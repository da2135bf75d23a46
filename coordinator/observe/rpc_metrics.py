"""How RPCs ended: a gRPC server interceptor counting them per method and final status code.

Runs once per RPC, never per message (an agent's whole AgentService/Connect stream is one RPC, so
heartbeats cost it nothing); read by the metrics at scrape time.
"""

from __future__ import annotations

import asyncio
import inspect

import grpc

# -- RPCs ----------------------------------------------------------------------------------------


def _code_name(code) -> str:
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    for status in grpc.StatusCode:  # some grpc versions hand back the number
        if status.value[0] == code:
            return status.name
    return "UNKNOWN"


def _outcome(error: BaseException | None, context) -> str:
    """The status code an RPC ended with, as its client sees it."""
    if error is None:
        return _code_name(context.code())
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):  # the client went away (or its deadline passed)
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    if isinstance(error, grpc.aio.AbortError):
        return _code_name(context.code())
    return "UNKNOWN"  # what grpc answers for an exception that escapes a handler


GRPC_TYPES = {
    (False, False): "unary",
    (True, False): "client_stream",
    (False, True): "server_stream",
    (True, True): "bidi_stream",
}
"""(request streaming, response streaming) -> grpc_type, as go-grpc-prometheus names them."""
GO_CODE_NAMES = {
    "OK": "OK", "CANCELLED": "Canceled", "UNKNOWN": "Unknown", "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded", "NOT_FOUND": "NotFound", "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied", "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition",
    "ABORTED": "Aborted", "OUT_OF_RANGE": "OutOfRange", "UNIMPLEMENTED": "Unimplemented", "INTERNAL": "Internal",
    "UNAVAILABLE": "Unavailable", "DATA_LOSS": "DataLoss", "UNAUTHENTICATED": "Unauthenticated",
}  # fmt: skip
"""grpc_code values as the Prometheus gRPC ecosystem writes them (Go's codes.Code.String()), so its dashboards and
alerts (grpc_code!="OK", grpc_code="Unavailable") work on gpuorch's series unchanged."""


def rpc_labels(method: str, types: dict[str, str]) -> list[str]:
    """[grpc_type, grpc_service, grpc_method] of a full method name ("/gpuorch.v1.JobService/SubmitJob")."""
    service, _, name = method.lstrip("/").rpartition("/")
    return [types.get(method, "unary"), service or "unknown", name]


class _CountingContext:
    """A handler's context whose abort counts the RPC's status before grpc sends it.

    grpc's `abort` sends the status to the client and only then raises, so a count taken when the
    raise reaches the wrapper can land after the client has seen the status and scraped /metrics.
    """

    def __init__(self, context, finished) -> None:
        self._context = context
        self._finished = finished
        self.counted = False

    def __getattr__(self, name: str):
        # Kept once looked up: an agent's stream reads and writes through it for every heartbeat.
        value = getattr(self._context, name)
        setattr(self, name, value)
        return value

    async def abort(self, code, *details, **named):
        if not self.counted:
            self.counted = True
            self._finished(_code_name(code))
        await self._context.abort(code, *details, **named)


class RpcMetrics(grpc.aio.ServerInterceptor):
    """Counts RPCs started per method and handled per (method, final status code).

    Runs once per RPC, never per message: the handler is wrapped (once per method,
    cached) so that its end is seen; request streams are passed through untouched.
    Counts are plain ints on the event loop, read by the collector on the loop.
    """

    def __init__(self) -> None:
        self.started: dict[str, int] = {}
        self.handled: dict[tuple[str, str], int] = {}
        self.types: dict[str, str] = {"unknown": "unary"}
        """Full method name -> grpc_type (unary, client_stream, server_stream, bidi_stream)."""
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:  # unknown method: counted under one name, so callers cannot grow the label set
            self._count("unknown", "UNIMPLEMENTED")
            return None
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _count(self, method: str, code: str) -> None:
        self.started[method] = self.started.get(method, 0) + 1
        key = (method, code)
        self.handled[key] = self.handled.get(key, 0) + 1

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        self.types[method] = GRPC_TYPES[(bool(handler.request_streaming), bool(handler.response_streaming))]
        if handler.request_streaming and handler.response_streaming:
            behaviour, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            behaviour, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            behaviour, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            behaviour, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        started, handled = self.started, self.handled

        def finished(code: str) -> None:
            key = (method, code)
            handled[key] = handled.get(key, 0) + 1

        if inspect.isasyncgenfunction(behaviour):

            async def observed(request, context):
                started[method] = started.get(method, 0) + 1
                counting = _CountingContext(context, finished)
                try:
                    async for response in behaviour(request, counting):
                        yield response
                except BaseException as error:
                    if not counting.counted:
                        finished(_outcome(error, context))
                    raise
                if not counting.counted:
                    finished(_outcome(None, context))

        elif inspect.iscoroutinefunction(behaviour):

            async def observed_unary(request, context):
                started[method] = started.get(method, 0) + 1
                counting = _CountingContext(context, finished)
                try:
                    response = await behaviour(request, counting)
                except BaseException as error:
                    if not counting.counted:
                        finished(_outcome(error, context))
                    raise
                if not counting.counted:
                    finished(_outcome(None, context))
                return response

            return make(
                observed_unary, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
            )
        else:
            return handler  # a synchronous handler (none in gpuorch): left alone, not counted
        return make(observed, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
