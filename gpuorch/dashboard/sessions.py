"""Sign-in sessions and CSRF tokens, kept in the dashboard's memory.

A browser holds only a random session id, in an HttpOnly, SameSite=Strict cookie; the coordinator
token a person signed in with stays on the server, next to the session's CSRF token, which every
action must send back in the X-CSRF-Token header. Signing in gives a fresh session id (no fixation).
Plain data over an injected clock; the web layer (app.py) reads and sets the cookie.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from gpuorch.clock import SYSTEM_CLOCK, Clock

COOKIE = "gpuorch_session"
CSRF_HEADER = "X-CSRF-Token"


@dataclass(slots=True)
class Session:
    session_id: str
    csrf: str
    expires: float
    """Monotonic time after which the session is gone."""
    token: str = ""
    """The coordinator token this person signed in with; empty before sign-in."""
    user: str = ""
    role: str = ""

    @property
    def signed_in(self) -> bool:
        return bool(self.token)

    def csrf_matches(self, sent: str | None) -> bool:
        return bool(sent) and hmac.compare_digest(self.csrf.encode(), (sent or "").encode())


class Sessions:
    """Every live session by id; at most `limit` (the oldest go first), each for `lifetime` seconds."""

    def __init__(self, lifetime: float = 12 * 3600.0, limit: int = 10_000, clock: Clock = SYSTEM_CLOCK) -> None:
        self.lifetime = lifetime
        self.limit = limit
        self.clock = clock
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str | None) -> Session | None:
        """The live session of this id, or None (unknown or expired)."""
        session = self._sessions.get(session_id or "")
        if session is None:
            return None
        if session.expires <= self.clock.monotonic():
            del self._sessions[session.session_id]
            return None
        return session

    def new(self) -> Session:
        """A fresh anonymous session (it carries a CSRF token for the sign-in form and tokenless actions)."""
        while len(self._sessions) >= self.limit:
            del self._sessions[next(iter(self._sessions))]
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), self.clock.monotonic() + self.lifetime)
        self._sessions[session.session_id] = session
        return session

    def sign_in(self, old: Session | None, token: str, user: str, role: str) -> Session:
        """A new session holding `token`; the old one (if any) ends, so an id planted before sign-in is worthless."""
        if old is not None:
            self._sessions.pop(old.session_id, None)
        session = self.new()
        session.token, session.user, session.role = token, user, role
        return session

    def end(self, session: Session) -> None:
        self._sessions.pop(session.session_id, None)

    def any_token(self) -> str:
        """The token of the most recent signed-in session, or "" (the shared views' fallback reader)."""
        for session in reversed(self._sessions.values()):
            if session.signed_in and session.expires > self.clock.monotonic():
                return session.token
        return ""
