"""Who is calling and what they may do: bearer tokens, roles, and the rules over them.

The tokens file holds SHA-256 digests, never tokens, so reading it (or a backup of
it) gives nobody access. The rules are pure functions over plain data; `Guard` is the
thin layer that reads a call's metadata and aborts it.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import os
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc

from gpuorch.clock import SYSTEM_CLOCK
from gpuorch.logs import get_logger
from gpuorch.tls import NODE_URI_PREFIX

log = get_logger("coordinator.auth")

ROLES = ("admin", "user")
MAX_TOKEN_LENGTH = 4096
"""Longer authorization values are refused before hashing: a token is a few dozen characters."""
RELOAD_CHECK_SECONDS = 1.0
"""How often the tokens file's modification time is looked at, so tokens are added without a restart."""


class TokensFileError(ValueError):
    """The tokens file cannot be read or has a bad entry; the message names the file and the entry."""


class Action(enum.Enum):
    """What a call does, as far as permissions go."""

    READ = "read"
    """List and look at nodes and jobs, read logs."""
    SUBMIT = "submit"
    """Queue a job (it will be owned by the caller)."""
    CHANGE_JOB = "change a job"
    """Cancel or re-prioritise a job: its owner or an admin."""
    READ_PRIVATE = "read a job's logs and env values"
    """A job's logs and the values of its env (often secrets): its owner or an admin."""
    INTERACT = "attach to, exec in or forward a port to a job"
    """Interactive sessions on a job's ranks (they run as the job's owner): its owner or an admin."""
    OPERATE = "operate nodes"
    """Drain and resume nodes: admins only."""


@dataclass(frozen=True)
class Caller:
    """An authenticated user, or everyone when tokens are off."""

    user: str
    role: str
    authenticated: bool = True

    def __str__(self) -> str:
        return f"{self.user} ({self.role})" if self.authenticated else "anonymous"


OPEN_ACCESS = Caller(user="", role="admin", authenticated=False)
"""Tokens off, over TCP: every caller may do everything, and a job's owner is what its spec says."""


@dataclass(frozen=True)
class TokenEntry:
    user: str
    role: str
    digest: bytes
    """SHA-256 of the token."""


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(document: dict, where: str) -> tuple[TokenEntry, ...]:
    """The [[tokens]] tables of a parsed TOML document; raises TokensFileError naming the bad entry."""
    unknown = sorted(set(document) - {"tokens"})
    if unknown:
        raise TokensFileError(f"{where}: unknown key {unknown[0]!r}; the file holds only [[tokens]] tables")
    tables = document.get("tokens", [])
    if not isinstance(tables, list):
        raise TokensFileError(f"{where}: 'tokens' must be an array of tables ([[tokens]])")
    entries: list[TokenEntry] = []
    seen: dict[bytes, int] = {}
    for number, table in enumerate(tables, start=1):
        entry_where = f"{where}: [[tokens]] entry {number}"
        if not isinstance(table, dict):
            raise TokensFileError(f"{entry_where} is not a table")
        extra = sorted(set(table) - {"user", "role", "sha256"})
        if extra:
            raise TokensFileError(f"{entry_where}: unknown key {extra[0]!r} (known: user, role, sha256)")
        user, role, sha = table.get("user"), table.get("role"), table.get("sha256")
        if not isinstance(user, str) or not user.strip():
            raise TokensFileError(f"{entry_where}: user must be a non-empty string")
        if role not in ROLES:
            raise TokensFileError(f"{entry_where} ({user}): role must be 'admin' or 'user', got {role!r}")
        try:
            digest = bytes.fromhex(sha) if isinstance(sha, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != hashlib.sha256().digest_size:
            raise TokensFileError(f"{entry_where} ({user}): sha256 must be 64 hex digits (the SHA-256 of the token)")
        if digest in seen:
            raise TokensFileError(f"{entry_where} ({user}): same sha256 as entry {seen[digest]}; each token must be unique")
        seen[digest] = number
        entries.append(TokenEntry(user=user.strip(), role=role, digest=digest))
    return tuple(entries)


def load_tokens_file(path: str | os.PathLike[str]) -> tuple[TokenEntry, ...]:
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise TokensFileError(f"tokens file {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise TokensFileError(f"tokens file {path} is not valid TOML: {error}") from None
    return parse_tokens(document, f"tokens file {path}")


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str | None, str]:
    """The token of an `authorization: Bearer TOKEN` header, or (None, why it is missing or malformed)."""
    values = [value for key, value in (metadata or ()) if key == "authorization"]
    if not values:
        return None, "no authorization metadata; send 'authorization: Bearer TOKEN' (gpuctl --token or $GPUORCH_TOKEN)"
    if len(values) > 1:
        return None, "more than one authorization header"
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None, "authorization metadata must be 'Bearer TOKEN'"
    if len(token) > MAX_TOKEN_LENGTH:
        return None, f"bearer token is longer than {MAX_TOKEN_LENGTH} characters"
    return token.strip(), ""


def authenticate(entries: tuple[TokenEntry, ...], token: str) -> Caller | None:
    """The caller a token belongs to, or None.

    Every entry is compared, with a constant-time comparison, so the time taken does not
    tell which entry (or how much of a digest) matched.
    """
    digest = token_digest(token)
    found: TokenEntry | None = None
    for entry in entries:
        if hmac.compare_digest(entry.digest, digest):
            found = entry
    return None if found is None else Caller(user=found.user, role=found.role)


def authorize(caller: Caller, action: Action, job_owner: str | None = None) -> str | None:
    """None if `caller` may do `action` (on a job owned by `job_owner`), else why not."""
    if caller.role == "admin" or action in (Action.READ, Action.SUBMIT):
        return None
    if action in (Action.CHANGE_JOB, Action.READ_PRIVATE, Action.INTERACT):
        if job_owner == caller.user:
            return None
        what = {Action.CHANGE_JOB: "change their own jobs", Action.READ_PRIVATE: "read the logs of their own jobs"}.get(
            action, "attach to, exec in or forward ports to their own jobs"
        )
        return f"{caller.user} may only {what}; this job belongs to {job_owner or 'nobody'} (needs role admin)"
    return f"{caller.user} has role {caller.role}; to {action.value} needs role admin"


def priority_problem(caller: Caller, priority: int, max_user_priority: int) -> str | None:
    """None if `caller` may give a job `priority`, else why not: above max_user_priority needs an admin."""
    if caller.role == "admin" or priority <= max_user_priority:
        return None
    return (
        f"priority {priority} is above max_user_priority={max_user_priority}; "
        f"{caller.user} has role {caller.role}, and higher needs role admin"
    )


def redact_env(job, caller: Caller):
    """The job as `caller` may see it: env values only for its owner and admins, else names with empty values."""
    if caller.role == "admin" or caller.user == job.spec.owner or not job.spec.env:
        return job
    hidden = type(job)()
    hidden.CopyFrom(job)
    for name in list(hidden.spec.env):  # a copy: writes to a protobuf map while it is walked are partly lost
        hidden.spec.env[name] = ""
    hidden.env_redacted = True
    return hidden


class Guard:
    """Authenticates and authorizes calls for the services; with no tokens file, lets everything through."""

    def __init__(
        self, tokens_file: str = "", clock: Callable[[], float] = SYSTEM_CLOCK.monotonic, tokenless_tcp_clients: bool = True
    ) -> None:
        self.tokens_file = tokens_file
        self.clock = clock
        self.tokenless_tcp_clients = tokenless_tcp_clients
        """With tokens off: serve callers over TCP as OPEN_ACCESS (True), or refuse them (only the local socket serves)."""
        self.local_peers: dict[str, Caller] = {}
        """grpc peer string ("unix:<path>") of each connection relayed from the local socket -> the kernel's word on its user."""
        self.entries: tuple[TokenEntry, ...] = ()
        self._loaded_mtime: float | None = None
        self._checked_at = float("-inf")
        if tokens_file:
            self._loaded_mtime = os.stat(tokens_file).st_mtime if os.path.exists(tokens_file) else None
            self.entries = load_tokens_file(tokens_file)  # a bad file stops the start with its error

    @property
    def enabled(self) -> bool:
        return bool(self.tokens_file)

    @property
    def owners_authenticated(self) -> bool:
        """True when every path that can submit a job names its owner from a proof: a token, or the kernel.

        The local socket always does (SO_PEERCRED); TCP does with tokens on, or when tokenless
        TCP clients are refused. Agents trust a job's owner (switch to that user) only then.
        """
        return self.enabled or not self.tokenless_tcp_clients

    def _maybe_reload(self) -> None:
        """Re-reads the tokens file when it changed; a broken edit keeps the tokens that were loaded."""
        now = self.clock()
        if now - self._checked_at < RELOAD_CHECK_SECONDS:
            return
        self._checked_at = now
        try:
            mtime = os.stat(self.tokens_file).st_mtime
        except OSError as error:
            log.error("tokens file unreadable; keeping the tokens loaded before", file=self.tokens_file, error=str(error))
            return
        if mtime == self._loaded_mtime:
            return
        try:
            self.entries = load_tokens_file(self.tokens_file)
        except TokensFileError as error:
            log.error("tokens file changed but is invalid; keeping the tokens loaded before", error=str(error))
        else:
            log.info("tokens file reloaded", file=self.tokens_file, tokens=len(self.entries))
        self._loaded_mtime = mtime

    def identify(self, metadata, peer: str = "") -> tuple[Caller | None, str]:
        """The caller of a call with this metadata from this peer, or (None, why not).

        A connection relayed from the local socket is its kernel-reported user, whatever it sends.
        """
        local = self.local_peers.get(peer) if peer else None
        if local is not None:
            return local, ""
        if not self.enabled:
            if not self.tokenless_tcp_clients:
                return None, (
                    "tokens are off and tokenless_tcp_clients is false: connect through the coordinator's local socket "
                    "(gpuctl --coordinator unix:PATH), where the kernel says who you are"
                )
            return OPEN_ACCESS, ""
        self._maybe_reload()
        token, problem = bearer_token(metadata)
        if token is None:
            return None, problem
        caller = authenticate(self.entries, token)
        if caller is None:
            return None, "bearer token is not valid (unknown, or revoked from the tokens file)"
        return caller, ""

    async def authenticate(self, context: grpc.aio.ServicerContext) -> Caller:
        """The caller; a call without a valid token ends UNAUTHENTICATED."""
        caller, problem = self.identify(context.invocation_metadata(), context.peer())
        if caller is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
        return caller

    @staticmethod
    async def permit(context: grpc.aio.ServicerContext, caller: Caller, action: Action, job_owner: str | None = None) -> None:
        """Ends the call PERMISSION_DENIED unless `caller` may do `action`."""
        denial = authorize(caller, action, job_owner)
        if denial is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, denial)

    async def check(self, context: grpc.aio.ServicerContext, action: Action) -> Caller:
        """The caller, if it is authenticated and may do `action`."""
        caller = await self.authenticate(context)
        await self.permit(context, caller, action)
        return caller

    def client_key(self, context: grpc.aio.ServicerContext) -> str:
        """Whom a stream counts against: the authenticated user, else the peer's host (without the port)."""
        caller, _ = self.identify(context.invocation_metadata(), context.peer())
        if caller is not None and caller.authenticated:
            return f"user {caller.user}"
        peer = context.peer() or "unknown"
        host = peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
        return f"peer {host}"


class StreamQuota:
    """Caps the open server streams (watches, log reads, health watches, reflection) of each client and of
    all clients together, so neither one client nor many can hold the server's memory."""

    def __init__(self, limit: int, total_limit: int = 0) -> None:
        self.limit = limit
        self.total_limit = total_limit
        self.open: dict[str, int] = {}
        self.total = 0

    def try_open(self, client: str) -> str | None:
        """None and the stream counted, or why it is refused."""
        count = self.open.get(client, 0)
        if self.limit and count >= self.limit:
            return f"{client} already has {count} open streams; the limit is max_streams_per_client={self.limit}"
        if self.total_limit and self.total >= self.total_limit:
            return f"the coordinator already has {self.total} open streams; the limit is max_streams={self.total_limit}"
        self.open[client] = count + 1
        self.total += 1
        return None

    def close(self, client: str) -> None:
        if client in self.open:
            self.total -= 1
        count = self.open.get(client, 0) - 1
        if count > 0:
            self.open[client] = count
        else:
            self.open.pop(client, None)

    @contextlib.asynccontextmanager
    async def slot(self, context: grpc.aio.ServicerContext, client: str):
        """Holds one of `client`'s streams while the body runs; one beyond the limit ends RESOURCE_EXHAUSTED."""
        refusal = self.try_open(client)
        if refusal is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        try:
            yield
        finally:
            self.close(client)


def node_identity_problem(
    node_id: str, certificate_node_ids: list[str], mutual_tls: bool, agent_listen: str = "", allowed_nodes: Iterable[str] = ()
) -> str | None:
    """None if a stream may register as `node_id`, else why not.

    With mutual TLS the id must be one the certificate vouches for as a node (its URI SAN
    spiffe://gpuorch/node/<id>; see gpuorch.tls.peer_identities): a person's certificate from
    the same CA names no node, whatever its DNS names. A non-empty `allowed_nodes` admits only those ids.
    """
    allowed = list(allowed_nodes)
    if allowed and node_id not in allowed:
        return f"node id {node_id!r} is not in allowed_nodes; add it there to let it register"
    if not mutual_tls:
        return None
    if not certificate_node_ids:
        where = f"connect to agent_listen ({agent_listen}) " if agent_listen else ""
        return (
            f"node {node_id!r} presented no node certificate; agents must {where}with a certificate signed by tls_client_ca "
            f"that names their node id as the URI subjectAltName {NODE_URI_PREFIX}<node id> (scripts/make-certs.sh issues them)"
        )
    if node_id not in certificate_node_ids:
        return (
            f"node id {node_id!r} is not the node named in the client certificate ({', '.join(certificate_node_ids)}); "
            "a node may only register as itself"
        )
    return None
