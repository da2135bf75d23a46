"""The SDK's channels: one per coordinator address, TLS and token per address, and each call's walk to the leader.

A client is given one address or a list (`--coordinator a:50051,b:50051`). Every call goes to the
leader it last found; when that fails UNAVAILABLE, it follows gpuorch.leader: the leader a standby
names at once, else the next address, with a backoff delay between full rounds. A call is sent
again only when that is safe: a standby's answer (it processed nothing) always, any other
UNAVAILABLE only for the methods in RETRIED_METHODS, which are reads or carry an id that makes
a repeat harmless.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from gpuorch import settings, tls
from gpuorch.addresses import DEFAULT_PORT, AddressError, is_local_address, parse_address, parse_address_list
from gpuorch.backoff import Backoff
from gpuorch.client_usage import USAGE_METHODS
from gpuorch.clock import SYSTEM_CLOCK
from gpuorch.errors import GpuorchError, from_rpc_error
from gpuorch.leader import Outcome, advance, begin, standby_leader
from gpuorch.v1 import cluster_pb2, cluster_pb2_grpc, job_pb2_grpc

DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"

RETRIED_METHODS = {
    "cluster": ("ListNodes", "GetNode", "GetClusterStatus", "DrainNode", "ResumeNode", *USAGE_METHODS),
    # SubmitJob is safe to repeat because every submission carries a client_request_id (see
    # submit_job); CancelJob is not retried: a repeat would answer FAILED_PRECONDITION.
    "job": ("SubmitJob", "GetJob", "ListJobs", "SetJobPriority", "WatchJob", "GetJobLogs", "GetUsage"),
}
RETRY_ROUNDS = 5
"""Rounds over the coordinators a call makes before it fails UNAVAILABLE (within the call's timeout)."""
ROUND_BACKOFF_INITIAL = 0.5
ROUND_BACKOFF_CAP = 5.0
"""The backoff between rounds (gpuorch.backoff, seconds): 0.25-0.5 s after the first, doubling up to 2.5-5 s."""
CHANNEL_OPTIONS = [
    # grpc's transparent retries only (a call that never left this process); the rounds above do the rest.
    ("grpc.enable_retries", 1),
    # Reconnect soon after a refused connection (default 1 s, growing): a retry finds the coordinator
    # once it serves instead of failing fast on a channel still backing off.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
PROBE_SECONDS = 2.0
"""How long the one call that finds out why a coordinator is unreachable may take."""

CLIENT_INSECURE_VARIABLE = "GPUORCH_CLIENT_INSECURE"
"""Says a client may speak plaintext off this machine. Not GPUORCH_INSECURE: that is the coordinator's
own `insecure` setting, and one exported for gpuctl must not open a coordinator started from the same shell."""


def default_address() -> str:
    """$GPUORCH_COORDINATOR (one address or a list), else 127.0.0.1:50051; port 50051 where an address names none."""
    text = os.environ.get("GPUORCH_COORDINATOR") or DEFAULT_ADDRESS
    try:
        return ",".join(parse_address_list(text, setting="$GPUORCH_COORDINATOR"))
    except AddressError:
        return text  # the client that uses it says what is wrong with it


def insecure_from_environment() -> bool:
    """$GPUORCH_CLIENT_INSECURE, read as the daemons read a boolean setting: a value that is neither is an error."""
    value = os.environ.get(CLIENT_INSECURE_VARIABLE, "")
    return bool(value) and settings.convert(value, bool, f"${CLIENT_INSECURE_VARIABLE}")


@dataclass
class Link:
    """One coordinator address: its channel, its stubs and the metadata every call to it carries."""

    address: str
    channel: Any
    stubs: dict[str, Any]
    metadata: tuple[tuple[str, str], ...]
    open: Callable[..., Any]
    """Opens another channel to the same address with the same credentials (the probe's)."""


class Attempts:
    """One call's walk over the coordinators: where to send it now, and whether and when to send it again."""

    def __init__(self, owner: Channels, service: str, method: str, timeout: float | None) -> None:
        self.owner = owner
        self.retried = method in RETRIED_METHODS.get(service, ())
        self.state = begin(owner.addresses, owner.leader)
        self.backoff = Backoff(initial=ROUND_BACKOFF_INITIAL, cap=ROUND_BACKOFF_CAP)
        self.rounds = 1
        self.deadline = None if timeout is None else SYSTEM_CLOCK.monotonic() + timeout

    def link(self) -> Link:
        return self.owner.link(self.state.current)

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - SYSTEM_CLOCK.monotonic())

    def served(self) -> None:
        self.owner.leader = self.state.current

    def retry_delay(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before sending the call again (0: at once, to the next address), or None: give up."""
        code = error.code()
        if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            self.served()  # it answered: whatever it said, it is the coordinator that serves
            return None
        if code != grpc.StatusCode.UNAVAILABLE:
            return None
        trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        named = standby_leader(trailing)
        if named is None and not self.retried:
            return None  # the request may have reached a leader that then went away: not resent
        outcome = Outcome.STANDBY if named is not None else Outcome.UNREACHABLE
        self.state, step = advance(self.state, outcome, named or "")
        if not step.wait:
            return 0.0
        self.rounds += 1
        if self.rounds > RETRY_ROUNDS:
            return None
        delay = self.backoff.next_delay()
        remaining = self.remaining()
        return None if remaining is not None and delay >= remaining else delay


class Channels:
    """Opens the channels of a Client or AsyncClient: addresses, TLS and token, with the environment's defaults."""

    addresses: tuple[str, ...]
    leader: str
    """The address that last served a call ("" before the first): every call goes there first."""

    def _connect(self, channel_module, address, timeout, options, token, tls_ca, tls_cert, tls_key, insecure) -> None:
        setting = "address" if address else "$GPUORCH_COORDINATOR"
        self.addresses = parse_address_list(address or os.environ.get("GPUORCH_COORDINATOR") or DEFAULT_ADDRESS, setting=setting)
        self.leader = ""
        self.timeout = timeout
        self._channel_module = channel_module
        self._token = os.environ.get("GPUORCH_TOKEN", "") if token is None else token
        self._tls = (os.environ.get("GPUORCH_TLS_CA", "") if tls_ca is None else tls_ca, tls_cert or "", tls_key or "")
        self._insecure = insecure_from_environment() if insecure is None else insecure
        self._options = [*CHANNEL_OPTIONS, *(options or [])]
        self._links: dict[str, Link] = {}
        for each in self.addresses:
            self.link(each)  # TLS files are read now, so a bad one fails here and not at the first call

    @property
    def address(self) -> str:
        """The coordinator that last served a call, else the addresses given (comma-separated)."""
        return self.leader or ",".join(self.addresses)

    def link(self, address: str) -> Link:
        """The channel to `address`, opened on first use (a leader a standby names may be in no list)."""
        known = self._links.get(address)
        if known is not None:
            return known
        address = parse_address(address)
        # The coordinator's local socket knows the caller from the kernel: no token, no TLS.
        token = "" if address.startswith("unix:") else self._token
        tls_ca, tls_cert, tls_key = self._tls
        # Plaintext only to this machine, the same rule the coordinator follows, so a token never
        # crosses the network in the clear: elsewhere TLS, trusting tls_ca or else the system's
        # roots, unless `insecure` says the coordinator serves plaintext on purpose.
        if not address.startswith("unix:") and (tls_ca or tls_cert or not (self._insecure or is_local_address(address))):
            credentials = tls.channel_credentials(tls_ca, tls_cert, tls_key)
            opener = functools.partial(self._channel_module.secure_channel, address, credentials)
        else:
            opener = functools.partial(self._channel_module.insecure_channel, address)
        channel = opener(options=self._options)
        stubs = {"cluster": cluster_pb2_grpc.ClusterServiceStub(channel), "job": job_pb2_grpc.JobServiceStub(channel)}
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._links[address] = Link(address, channel, stubs, metadata, opener)
        return self._links[address]

    def _attempts(self, service: str, method: str, timeout: float | None) -> Attempts:
        return Attempts(self, service, method, timeout)

    def _must_locate_leader(self, service: str, method: str) -> bool:
        """A call that is not resent after a lost connection goes to a known leader: with several
        addresses and none known yet, a safe read finds it first."""
        return len(self.addresses) > 1 and not self.leader and method not in RETRIED_METHODS.get(service, ())

    def _failure(self, error: grpc.RpcError, link: Link, probe_error: grpc.RpcError | None) -> GpuorchError:
        """After a deadline: when one call without retries (the probe) cannot connect either, grpc spent the
        deadline retrying a connection, and the coordinator is not reachable rather than slow; the probe's
        error says why (refused, a TLS mismatch). Otherwise the error itself."""
        where = link.address if len(self.addresses) == 1 else self.address
        if probe_error is not None and probe_error.code() == grpc.StatusCode.UNAVAILABLE:
            return from_rpc_error(probe_error, where)
        return from_rpc_error(error, where)

    @staticmethod
    def _needs_probe(error: grpc.RpcError) -> bool:
        return error.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    @staticmethod
    def _probe(link: Link):
        """A fresh channel without retries, and the call to make on it to learn why connections fail."""
        channel = link.open(options=[("grpc.enable_retries", 0)])
        call = functools.partial(
            cluster_pb2_grpc.ClusterServiceStub(channel).GetClusterStatus,
            cluster_pb2.GetClusterStatusRequest(),
            timeout=PROBE_SECONDS,
            metadata=link.metadata,
        )
        return channel, call

    @staticmethod
    def _locating_request() -> tuple[str, str, Any]:
        return "cluster", "GetClusterStatus", cluster_pb2.GetClusterStatusRequest()
