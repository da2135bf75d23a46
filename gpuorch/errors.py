"""SDK errors: one exception type per gRPC status the API uses, each with the server's message."""

from __future__ import annotations

import grpc


class GpuorchError(Exception):
    """A call to the coordinator failed. `code` is the gRPC status, `details` the server's reason."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code


class NotFound(GpuorchError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(GpuorchError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(GpuorchError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(GpuorchError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(GpuorchError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GpuorchError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(GpuorchError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


_BY_CODE = {cls.code: cls for cls in GpuorchError.__subclasses__()}


def from_rpc_error(error: grpc.RpcError, address: str) -> GpuorchError:
    """Turns a gRPC error into the matching GpuorchError with a message a person can act on."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"coordinator at {address} is not reachable ({details})"
        if "WRONG_VERSION_NUMBER" in details:  # our TLS hello was answered in plaintext
            details += "; it seems to serve plaintext: if it runs with insecure on purpose, pass --insecure (insecure=True)"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = f"coordinator at {address} did not answer in time"
    cls = _BY_CODE.get(code, GpuorchError)
    return cls(details or code.name, code)
