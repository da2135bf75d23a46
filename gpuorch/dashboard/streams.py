"""Server-sent events: the shared views after every refresh, and per viewer a job as it changes
(JobService/WatchJob) and a rank's output as it grows (GetJobLogs with follow), each read with the
viewer's own token. A stream ends when the browser goes away; a failed read is sent as a `problem`
event, and the page's EventSource reconnects by itself."""

from __future__ import annotations

import asyncio
import codecs
import json

from aiohttp import web

from gpuorch.dashboard.api import client_of, reader
from gpuorch.dashboard.app import FEED
from gpuorch.dashboard.shapes import job_json
from gpuorch.errors import GpuorchError

TOPICS = {"cluster", "queue"}
KEEPALIVE_SECONDS = 15.0
LOG_TAIL_LINES = 500


def event(topic: str, data: object) -> bytes:
    return f"event: {topic}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    return response


async def shared(request: web.Request) -> web.StreamResponse:
    await reader(request)
    topics = set(request.query.get("topics", "cluster,queue").split(",")) & TOPICS
    response = await open_stream(request)
    try:
        async for payload in request.app[FEED].subscribe(topics):
            await response.write(payload)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    return response


async def _pipe(request: web.Request, response: web.StreamResponse, source, topic: str, shape) -> None:
    """Writes each item of `source` as an event; a failure becomes a `problem` event; keepalives between."""
    iterator = source.__aiter__()
    try:
        while True:
            try:
                item = await asyncio.wait_for(iterator.__anext__(), KEEPALIVE_SECONDS)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            except StopAsyncIteration:
                await response.write(event("end", {}))
                return
            await response.write(event(topic, shape(item)))
    except GpuorchError as error:
        await response.write(event("problem", {"error": str(error)}))
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        await iterator.aclose()


async def job_events(request: web.Request) -> web.StreamResponse:
    viewer = await reader(request)
    response = await open_stream(request)
    source = client_of(request, viewer).watch_job(request.match_info["job_id"])
    await _pipe(request, response, source, "job", job_json)
    return response


async def log_events(request: web.Request) -> web.StreamResponse:
    viewer = await reader(request)
    try:
        rank = int(request.query.get("rank", "0"))
        attempt = int(request.query.get("attempt", "0"))
    except ValueError:
        raise web.HTTPBadRequest(text="rank and attempt must be whole numbers") from None
    response = await open_stream(request)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    source = client_of(request, viewer).job_logs(
        request.match_info["job_id"], rank, attempt=attempt, tail_lines=LOG_TAIL_LINES, follow=True
    )
    await _pipe(request, response, source, "log", decoder.decode)
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/events", shared)
    app.router.add_get("/api/v1/jobs/{job_id}/events", job_events)
    app.router.add_get("/api/v1/jobs/{job_id}/logs/events", log_events)
