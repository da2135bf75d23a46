"""grpc.health.v1.Health, answering every method and saying why it refuses."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from coordinator.api.auth import StreamQuota


class ServiceHealth(HealthServicer):
    """grpc.health.v1.Health with every method answered, every refusal saying why, and watches counted.

    The stock servicer answers a Check of an unknown service NOT_FOUND with an empty
    message, which leaves a probe with a typo in its service name guessing, and does not
    implement List at all (UNIMPLEMENTED). Statuses are the stock servicer's own
    `_server_status`, so graceful shutdown (which sets them directly) shows in both.
    Health needs no token, so its open-ended Watch streams count against their client's
    max_streams_per_client like any other stream: probes cannot be used to hold memory.
    """

    _server_status: dict[str, int]
    """The stock servicer's statuses by service name (set by its __init__ and set())."""

    def __init__(self, streams: StreamQuota, client_key: Any) -> None:
        super().__init__()
        self.streams = streams
        self.client_key = client_key

    async def Check(self, request: health_pb2.HealthCheckRequest, context):
        if request.service not in self._server_status:
            known = ", ".join(repr(name) for name in sorted(self._server_status))
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no health status for service {request.service[:200]!r}; known services: {known}"
            )
        return await super().Check(request, context)

    async def List(self, request: Any, context: Any) -> Any:  # HealthListRequest/Response: newer than the type stubs
        response = health_pb2.HealthListResponse()  # type: ignore[attr-defined]
        for service, status in self._server_status.items():
            response.statuses[service].status = status
        return response

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        async with self.streams.slot(context, self.client_key(context)):
            await super().Watch(request, context)
