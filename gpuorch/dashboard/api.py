"""/api/v1/: the JSON the pages use, documented at /api/v1 so people can script against it with curl,
and the actions (cancel, priority, drain, resume), each made with the viewer's own token."""

from __future__ import annotations

import json

from aiohttp import web

from gpuorch.dashboard.app import FEED, Viewer, check_action, viewer_of
from gpuorch.dashboard.shapes import GPU_COLUMNS, history_json, job_json, node_json
from gpuorch.errors import (
    FailedPrecondition,
    GpuorchError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)  # fmt: skip

ENDPOINTS = {
    "GET /api/v1/me": "who you are here: tokens on, signed in, user, role, whether you may act",
    "GET /api/v1/nodes": "every node with its GPUs as rows (columns named in 'columns'), refreshed every few seconds",
    "GET /api/v1/nodes/{node_id}": "one node, read now, with each GPU's telemetry history under 'history'",
    "GET /api/v1/jobs": "the queue: running jobs by start, then pending ones in the forecast's order (all of them)",
    "GET /api/v1/jobs/{job_id}": "one job: spec, state, placement and every attempt",
    "GET /api/v1/jobs/{job_id}/logs?rank=0&tail=200": "the last lines of a rank's output, as text",
    "GET /api/v1/usage?range=day|week|90d": "GPUs total and allocated, utilisation over time; GPU-hours by owner and pool",
    "GET /api/v1/events?topics=cluster,queue": "server-sent events: the cluster and the queue after every refresh",
    "GET /api/v1/jobs/{job_id}/events": "server-sent events: the job after every change (WatchJob)",
    "GET /api/v1/jobs/{job_id}/logs/events?rank=0": "server-sent events: a rank's output as it grows",
    "POST /api/v1/jobs/{job_id}/cancel": "cancel (owner or admin); header X-CSRF-Token",
    "POST /api/v1/jobs/{job_id}/priority": 'set the priority, body {"priority": N}; header X-CSRF-Token',
    "POST /api/v1/nodes/{node_id}/drain": 'drain, body {"reason": "..."} (admin); header X-CSRF-Token',
    "POST /api/v1/nodes/{node_id}/resume": "resume (admin); header X-CSRF-Token",
}
"""Scripts sign in as the browser does: POST /login with token and csrf (from the page), keeping the cookie."""

ERROR_STATUS = {
    NotFound: 404, InvalidArgument: 400, FailedPrecondition: 409, PermissionDenied: 403, Unauthenticated: 401,
    Unavailable: 503,
}  # fmt: skip


def problem(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def from_error(error: GpuorchError) -> web.Response:
    status = next((code for kind, code in ERROR_STATUS.items() if isinstance(error, kind)), 502)
    return problem(status, str(error))


async def reader(request: web.Request) -> Viewer:
    """The viewer, if they may read; 401 with the reason otherwise."""
    viewer = await viewer_of(request)
    if not viewer.allowed:
        raise web.HTTPUnauthorized(text="sign in first: POST /login with your token", content_type="text/plain")
    return viewer


def client_of(request: web.Request, viewer: Viewer):
    return request.app[FEED].coordinators.client(viewer.token)


async def me(request: web.Request) -> web.Response:
    return web.json_response((await viewer_of(request)).me())


async def index(request: web.Request) -> web.Response:
    return web.json_response({"endpoints": ENDPOINTS})


async def nodes(request: web.Request) -> web.Response:
    await reader(request)
    feed = request.app[FEED]
    return web.json_response({"columns": GPU_COLUMNS, "nodes": feed.nodes, "updated": feed.updated, "error": feed.error})


async def node(request: web.Request) -> web.Response:
    viewer = await reader(request)
    try:
        found = await client_of(request, viewer).get_node(request.match_info["node_id"], include_telemetry_history=True)
    except GpuorchError as error:
        return from_error(error)
    return web.json_response({**node_json(found), "columns": GPU_COLUMNS, "history": history_json(found)})


async def jobs(request: web.Request) -> web.Response:
    await reader(request)
    feed = request.app[FEED]
    return web.json_response({"jobs": feed.jobs, "updated": feed.updated, "error": feed.error})


async def job(request: web.Request) -> web.Response:
    viewer = await reader(request)
    try:
        found = await client_of(request, viewer).get_job(request.match_info["job_id"])
    except GpuorchError as error:
        return from_error(error)
    return web.json_response(job_json(found))


def _int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a whole number, got {text!r}") from None
    if not low <= value <= high:
        raise web.HTTPBadRequest(text=f"{name} must be between {low} and {high}, got {value}")
    return value


async def logs(request: web.Request) -> web.Response:
    viewer = await reader(request)
    rank, tail = _int(request, "rank", 0, 0, 1 << 20), _int(request, "tail", 200, 1, 100_000)
    chunks = []
    try:
        async for chunk in client_of(request, viewer).job_logs(request.match_info["job_id"], rank, tail_lines=tail):
            chunks.append(chunk)
    except GpuorchError as error:
        return from_error(error)
    return web.Response(body=b"".join(chunks), content_type="text/plain", charset="utf-8")


async def usage(request: web.Request) -> web.Response:
    viewer = await reader(request)
    range_name = request.query.get("range", "day")
    if range_name not in ("day", "week", "90d"):
        return problem(400, f"range must be day, week or 90d, got {range_name!r}")
    try:
        return web.json_response(await request.app[FEED].usage(range_name, viewer.token))
    except GpuorchError as error:
        return from_error(error)


async def _body(request: web.Request) -> dict:
    if not request.can_read_body:
        return {}
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="the body is not JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object")
    return body


async def action(request: web.Request) -> web.Response:
    viewer = await viewer_of(request)
    check_action(request, viewer)
    body = await _body(request)
    client = client_of(request, viewer)
    kind, target = request.match_info["kind"], request.match_info["target"]
    verb = request.match_info["verb"]
    try:
        if kind == "jobs" and verb == "cancel":
            return web.json_response(job_json(await client.cancel_job(target)))
        if kind == "jobs" and verb == "priority":
            priority = body.get("priority")
            if not isinstance(priority, int) or isinstance(priority, bool):
                return problem(400, f"priority must be a whole number, got {priority!r}")
            return web.json_response(job_json(await client.set_job_priority(target, priority)))
        if kind == "nodes" and verb == "drain":
            reason = body.get("reason", "")
            if not isinstance(reason, str):
                return problem(400, "reason must be text")
            return web.json_response(node_json(await client.drain_node(target, reason)))
        if kind == "nodes" and verb == "resume":
            return web.json_response(node_json(await client.resume_node(target)))
    except GpuorchError as error:
        return from_error(error)
    return problem(404, f"no action {verb} on {kind}")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1", index)
    app.router.add_get("/api/v1/", index)
    app.router.add_get("/api/v1/me", me)
    app.router.add_get("/api/v1/nodes", nodes)
    app.router.add_get("/api/v1/nodes/{node_id}", node)
    app.router.add_get("/api/v1/jobs", jobs)
    app.router.add_get("/api/v1/jobs/{job_id}", job)
    app.router.add_get("/api/v1/jobs/{job_id}/logs", logs)
    app.router.add_get("/api/v1/usage", usage)
    app.router.add_post("/api/v1/{kind:jobs|nodes}/{target}/{verb}", action)
