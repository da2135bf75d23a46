"""The web application: who is looking (sign-in, sessions), the pages, and the security rules every
request goes through. The JSON API and the actions are in api.py, the per-viewer streams in streams.py.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from importlib import resources
from urllib.parse import quote, urlsplit

from aiohttp import web

from gpuorch.dashboard.feed import Coordinators, Feed
from gpuorch.dashboard.sessions import COOKIE, CSRF_HEADER, Session, Sessions
from gpuorch.errors import GpuorchError, Unauthenticated

STATIC = resources.files("gpuorch.dashboard") / "static"
PAGES = {"/": ("Cluster", "cluster"), "/queue": ("Queue", "queue"), "/usage": ("Usage", "usage"), "/admin": ("Admin", "admin")}
SECURITY_HEADERS = {
    # Everything comes from the dashboard itself: no CDN, no inline script.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
FEED = web.AppKey("feed", Feed)
SESSIONS = web.AppKey("sessions", Sessions)


@dataclass(frozen=True)
class DashboardConfig:
    own_token: str = ""
    """The dashboard's own token, for the shared views (and every call when tokens are off)."""
    allow_actions: bool = False
    """With tokens off: offer cancel, priority, drain and resume (to everyone who can reach the page)."""
    secure_cookie: bool = False
    """Send the session cookie only over HTTPS (set when the dashboard serves TLS)."""


CONFIG = web.AppKey("config", DashboardConfig)


@dataclass(frozen=True)
class Viewer:
    """Who is looking at a page and what the dashboard may do on their behalf."""

    session: Session
    tokens_on: bool
    token: str
    """The token calls made for this viewer carry."""
    can_act: bool
    admin: bool

    @property
    def allowed(self) -> bool:
        """May see the cluster at all: with tokens on, only once signed in."""
        return not self.tokens_on or self.session.signed_in

    def me(self) -> dict:
        session = self.session
        return {
            "tokens": self.tokens_on, "signed_in": session.signed_in, "user": session.user, "role": session.role,
            "can_act": self.can_act, "admin": self.admin,
        }  # fmt: skip


async def viewer_of(request: web.Request) -> Viewer:
    app = request.app
    feed, sessions, config = app[FEED], app[SESSIONS], app[CONFIG]
    session = sessions.get(request.cookies.get(COOKIE))
    if session is None:
        session = sessions.new()
        request["new_session"] = session
    if feed.tokens_on is None:
        try:
            await feed.learn_mode()
        except GpuorchError as error:
            raise web.HTTPServiceUnavailable(text=f"the coordinator does not answer: {error}") from None
    if feed.tokens_on:
        return Viewer(session, True, session.token, session.signed_in, session.signed_in and session.role == "admin")
    return Viewer(session, False, config.own_token, config.allow_actions, config.allow_actions)


def same_origin(request: web.Request) -> bool:
    """A state-changing request must come from the dashboard's own pages (when the browser says where from)."""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None
    parts = urlsplit(origin)
    return parts.netloc == request.host


def check_action(request: web.Request, viewer: Viewer) -> None:
    """Refuses an action without the session's CSRF token, from another origin, or by a viewer who may not act."""
    if not same_origin(request):
        raise web.HTTPForbidden(text="refused: the request comes from another origin")
    if not viewer.session.csrf_matches(request.headers.get(CSRF_HEADER)):
        raise web.HTTPForbidden(text=f"refused: missing or wrong {CSRF_HEADER} (reload the page)")
    if not viewer.can_act:
        why = "sign in first" if viewer.tokens_on else "this dashboard is read-only (start it with --allow-actions)"
        raise web.HTTPForbidden(text=f"refused: {why}")


@web.middleware
async def security(request: web.Request, handler):
    try:
        response = await handler(request)
    except web.HTTPException as error:
        response = error
    response.headers.update(SECURITY_HEADERS)
    session = request.get("new_session")
    if session is not None:
        config = request.app[CONFIG]
        response.set_cookie(COOKIE, session.session_id, httponly=True, samesite="Strict", secure=config.secure_cookie, path="/")
    if isinstance(response, web.HTTPException):
        raise response
    return response


def redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def render(title: str, page: str, viewer: Viewer, extra: str = "") -> web.Response:
    template = (STATIC / "page.html").read_text()
    me = json.dumps(viewer.me())
    text = (
        template.replace("{{title}}", html.escape(title))
        .replace("{{page}}", page)
        .replace("{{csrf}}", html.escape(viewer.session.csrf))
        .replace("{{me}}", html.escape(me))
        .replace("{{extra}}", html.escape(extra))
        .replace("{{user}}", html.escape(viewer.session.user or ("anonymous" if not viewer.tokens_on else "")))
    )
    return web.Response(text=text, content_type="text/html", headers={"Cache-Control": "no-store"})


async def page(request: web.Request) -> web.StreamResponse:
    viewer = await viewer_of(request)
    if not viewer.allowed:
        return redirect(f"/login?next={quote(request.path_qs, safe='')}")
    if request.path.startswith("/jobs/"):
        return render(f"Job {request.match_info['job_id']}", "job", viewer, request.match_info["job_id"])
    title, name = PAGES[request.path]
    return render(title, name, viewer)


async def login_page(request: web.Request) -> web.StreamResponse:
    viewer = await viewer_of(request)
    if not viewer.tokens_on:
        return redirect("/")
    return render("Sign in", "login", viewer, request.query.get("error", ""))


def _safe_next(target: str) -> str:
    return target if target.startswith("/") and not target.startswith("//") else "/"


async def login(request: web.Request) -> web.StreamResponse:
    viewer = await viewer_of(request)
    form = await request.post()
    if not same_origin(request) or not viewer.session.csrf_matches(str(form.get("csrf", ""))):
        raise web.HTTPForbidden(text="refused: missing or wrong CSRF token (reload the sign-in page)")
    token = str(form.get("token", "")).strip()
    target = _safe_next(str(form.get("next", "/")))
    coordinators: Coordinators = request.app[FEED].coordinators
    try:
        me = await coordinators.client(token).who_am_i() if token else None
    except Unauthenticated:
        me = None
    except GpuorchError as error:
        raise web.HTTPServiceUnavailable(text=f"the coordinator does not answer: {error}") from None
    if me is None or not me.authenticated:
        await coordinators.forget(token)
        return redirect(f"/login?error={quote('that token was refused')}&next={quote(target, safe='')}")
    session = request.app[SESSIONS].sign_in(viewer.session, token, me.user, me.role)
    request["new_session"] = session
    return redirect(target)


async def logout(request: web.Request) -> web.StreamResponse:
    viewer = await viewer_of(request)
    form = await request.post()
    if not same_origin(request) or not viewer.session.csrf_matches(str(form.get("csrf", ""))):
        raise web.HTTPForbidden(text="refused: missing or wrong CSRF token")
    request.app[SESSIONS].end(viewer.session)
    request["new_session"] = request.app[SESSIONS].new()
    return redirect("/login" if viewer.tokens_on else "/")


async def no_icon(request: web.Request) -> web.StreamResponse:
    return web.Response(status=204)


async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    kind = next((value for suffix, value in types.items() if name.endswith(suffix)), None)
    path = STATIC / name
    if kind is None or "/" in name or name.startswith(".") or not path.is_file():
        raise web.HTTPNotFound()
    return web.Response(body=path.read_bytes(), content_type=kind, headers={"Cache-Control": "no-cache"})


def build_app(feed: Feed, sessions: Sessions, config: DashboardConfig) -> web.Application:
    from gpuorch.dashboard import api, streams

    app = web.Application(middlewares=[security], client_max_size=64 * 1024)
    app[FEED], app[SESSIONS], app[CONFIG] = feed, sessions, config
    for path in PAGES:
        app.router.add_get(path, page)
    app.router.add_get("/jobs/{job_id}", page)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/favicon.ico", no_icon)
    api.add_routes(app)
    streams.add_routes(app)
    return app
