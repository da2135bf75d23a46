"""The Python SDK: `Client` (blocking) and `AsyncClient` (asyncio) over the gpuorch.v1 API.

Both share one table of methods (`_Api`); they differ only in how a call is
made. Methods return the wire messages (gpuorch.v1.*_pb2) and raise
gpuorch.errors.GpuorchError subclasses.
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Self

import grpc

from gpuorch import settings, tls
from gpuorch.array_api import ArrayApi, array_fields
from gpuorch.durations import parse_duration
from gpuorch.errors import GpuorchError, from_rpc_error
from gpuorch.v1 import cluster_pb2, cluster_pb2_grpc, job_pb2, job_pb2_grpc

DEFAULT_PORT = 50051
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"

RETRIED_METHODS = {
    "gpuorch.v1.ClusterService": ("ListNodes", "GetNode", "GetClusterStatus", "DrainNode", "ResumeNode"),
    # SubmitJob is safe to repeat because every submission carries a client_request_id (see
    # submit_job); CancelJob is not retried: a repeat would answer FAILED_PRECONDITION.
    "gpuorch.v1.JobService": ("SubmitJob", "GetJob", "ListJobs", "SetJobPriority", "WatchJob", "GetJobLogs"),
}
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.5s",
    "maxBackoff": "5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
"""grpc's own retries: a call that fails UNAVAILABLE (coordinator restarting, connection lost before
the answer) is sent again, up to 5 times with randomized exponential backoff within the call's timeout."""
_RETRIED_NAMES = [{"service": service, "method": method} for service, methods in RETRIED_METHODS.items() for method in methods]
SERVICE_CONFIG = json.dumps({"methodConfig": [{"name": _RETRIED_NAMES, "retryPolicy": RETRY_POLICY}]})
CHANNEL_OPTIONS = [
    ("grpc.enable_retries", 1),
    ("grpc.service_config", SERVICE_CONFIG),
    # Reconnect soon after a refused connection (default 1 s, growing): retries find the coordinator
    # once it serves instead of failing fast on a channel still backing off.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


PROBE_SECONDS = 2.0
"""How long the one call that finds out why a coordinator is unreachable may take."""


def with_default_port(address: str) -> str:
    """HOST (or [IPv6], or a bare IPv6 address) without a port gets :50051; anything else is left as it is.

    grpc itself would take port 443 for a bare host name, which no gpuorch coordinator listens on."""
    if address.startswith(("unix:", "unix-abstract:", "vsock:")):
        return address
    scheme = ""
    for prefix in ("dns:///", "ipv4:", "ipv6:"):
        if address.startswith(prefix):
            scheme, address = prefix, address[len(prefix) :]
            break
    if address.startswith("["):
        has_port = "]:" in address
    elif address.count(":") > 1:  # a bare IPv6 address such as ::1
        return f"{scheme}[{address}]:{DEFAULT_PORT}"
    else:
        has_port = ":" in address
    return scheme + (address if has_port else f"{address}:{DEFAULT_PORT}")


def default_address() -> str:
    """$GPUORCH_COORDINATOR, else 127.0.0.1:50051 (port 50051 when the variable names none)."""
    return with_default_port(os.environ.get("GPUORCH_COORDINATOR") or DEFAULT_ADDRESS)


def new_request_id() -> str:
    """A fresh client_request_id: random, so two submissions never share one by accident."""
    return f"gpuctl-{uuid.uuid4().hex}"


def _enum_values(enum, prefix: str, names: Iterable[str | int]) -> list[Any]:
    """Accepts enum numbers or names with or without the prefix ("READY", "NODE_STATE_READY").

    Returns the enum's numbers. Typed Any: each request's stub wants its own enum class there,
    which at run time is a plain int."""
    values: list[Any] = []
    for name in names:
        if isinstance(name, int):
            values.append(name)
            continue
        key = name.upper()
        key = key if key.startswith(prefix) else prefix + key
        try:
            values.append(enum.Value(key))
        except ValueError:
            known = ", ".join(
                n[len(prefix) :].lower()
                for n in (value.name for value in enum.DESCRIPTOR.values)
                if not n.endswith("UNSPECIFIED")
            )
            raise ValueError(f"unknown state {name!r}: use one of {known}") from None
    return values


def build_job_spec(
    argv: Iterable[str],
    *,
    gpus: int = 1,
    requirements: Mapping[str, Any] | job_pb2.JobRequirements | None = None,
    env: Mapping[str, str] | None = None,
    time_limit: str | int | None = None,
    **fields: Any,
) -> job_pb2.JobSpec:
    """A JobSpec from keyword arguments named like its fields. `time_limit` sets time_limit_seconds from
    seconds or a duration such as "90m", "2h", "1h30m" or "01:30:00" (ValueError naming it otherwise)."""
    if time_limit is not None:
        fields["time_limit_seconds"] = time_limit if isinstance(time_limit, int) else parse_duration(time_limit)
    fields = array_fields(fields)  # array="0-99%8", after=["j-...:ok"] (gpuorch/array_api.py)
    if isinstance(requirements, Mapping):
        requirements = job_pb2.JobRequirements(**requirements)
    return job_pb2.JobSpec(argv=list(argv), gpus=gpus, requirements=requirements, env=dict(env or {}), **fields)


class _Api(ArrayApi):
    """Every RPC of the public API once; `_unary`/`_stream` decide sync or async."""

    address: str

    def _unary(self, service: str, method: str, request: Any, extract: Callable[[Any], Any]) -> Any:
        raise NotImplementedError

    def _stream(self, service: str, method: str, request: Any, extract: Callable[[Any], Any]) -> Any:
        raise NotImplementedError

    # -- ClusterService -------------------------------------------------------------------

    def list_nodes(self, states: Iterable[str | int] = ()):
        """Nodes with their devices and latest telemetry; optionally only those in `states`."""
        request = cluster_pb2.ListNodesRequest(states=_enum_values(cluster_pb2.NodeState, "NODE_STATE_", states))
        return self._unary("cluster", "ListNodes", request, lambda response: list(response.nodes))

    def get_node(self, node_id: str):
        return self._unary("cluster", "GetNode", cluster_pb2.GetNodeRequest(node_id=node_id), lambda r: r.node)

    def cluster_status(self):
        return self._unary("cluster", "GetClusterStatus", cluster_pb2.GetClusterStatusRequest(), lambda r: r.status)

    def drain_node(self, node_id: str, reason: str = ""):
        request = cluster_pb2.DrainNodeRequest(node_id=node_id, reason=reason)
        return self._unary("cluster", "DrainNode", request, lambda r: r.node)

    def resume_node(self, node_id: str):
        return self._unary("cluster", "ResumeNode", cluster_pb2.ResumeNodeRequest(node_id=node_id), lambda r: r.node)

    # -- JobService -----------------------------------------------------------------------

    def submit_job(self, spec: job_pb2.JobSpec | None = None, *, client_request_id: str = "", **fields: Any):
        """Queues a job and returns its id. Pass a JobSpec, or its fields as keywords (argv=[...], gpus=4, ...).

        Without `client_request_id` a fresh one is made, so grpc's retries of this call (on UNAVAILABLE)
        can never queue the job twice; pass your own to make your own retries idempotent too.
        Without working_dir or submit_dir, submit_dir is the current directory: ranks run there
        when their node has it, so relative paths in argv mean what they mean here."""
        if spec is None:
            spec = build_job_spec(**fields)
        if not spec.working_dir and not spec.submit_dir:
            filled = job_pb2.JobSpec()
            filled.CopyFrom(spec)
            filled.submit_dir = os.path.abspath(os.getcwd())
            spec = filled
        request = job_pb2.SubmitJobRequest(spec=spec, client_request_id=client_request_id or new_request_id())
        return self._unary("job", "SubmitJob", request, lambda r: r.job_id)

    def get_job(self, job_id: str):
        return self._unary("job", "GetJob", job_pb2.GetJobRequest(job_id=job_id), lambda r: r.job)

    def list_jobs(self, states: Iterable[str | int] = (), owner: str = "", page_size: int = 0, page_token: str = ""):
        """One page of jobs, newest first: returns (jobs, next_page_token)."""
        request = job_pb2.ListJobsRequest(
            states=_enum_values(job_pb2.JobState, "JOB_STATE_", states), owner=owner, page_size=page_size, page_token=page_token
        )
        return self._unary("job", "ListJobs", request, lambda r: (list(r.jobs), r.next_page_token))

    def cancel_job(self, job_id: str):
        return self._unary("job", "CancelJob", job_pb2.CancelJobRequest(job_id=job_id), lambda r: r.job)

    def set_job_priority(self, job_id: str, priority: int):
        request = job_pb2.SetJobPriorityRequest(job_id=job_id, priority=priority)
        return self._unary("job", "SetJobPriority", request, lambda r: r.job)

    def watch_job(self, job_id: str):
        """The job now and after every change, until it is final."""
        return self._stream("job", "WatchJob", job_pb2.WatchJobRequest(job_id=job_id), lambda r: r.job)

    def job_logs(
        self, job_id: str, rank: int = 0, *, attempt: int = 0, tail_bytes: int = 0, tail_lines: int = 0, follow: bool = False
    ):
        """Chunks (bytes) of a rank's output: all of it, or the last `tail_lines` lines (which win), or the
        last `tail_bytes` bytes."""
        request = job_pb2.GetJobLogsRequest(
            job_id=job_id, rank=rank, attempt=attempt, tail_bytes=tail_bytes, tail_lines=tail_lines, follow=follow
        )
        return self._stream("job", "GetJobLogs", request, lambda r: r.data)


def _stubs(channel) -> dict[str, Any]:
    return {"cluster": cluster_pb2_grpc.ClusterServiceStub(channel), "job": job_pb2_grpc.JobServiceStub(channel)}


CLIENT_INSECURE_VARIABLE = "GPUORCH_CLIENT_INSECURE"
"""Says a client may speak plaintext off this machine. Not GPUORCH_INSECURE: that is the coordinator's
own `insecure` setting, and one exported for gpuctl must not open a coordinator started from the same shell."""


def insecure_from_environment() -> bool:
    """$GPUORCH_CLIENT_INSECURE, read as the daemons read a boolean setting: a value that is neither is an error."""
    value = os.environ.get(CLIENT_INSECURE_VARIABLE, "")
    return bool(value) and settings.convert(value, bool, f"${CLIENT_INSECURE_VARIABLE}")


def is_local_address(address: str) -> bool:
    """True for a unix socket or a loopback HOST:PORT: where plaintext stays on this machine."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:").rsplit(":", 1)[0]
    return tls.is_loopback_host(host)


class _Channel:
    """Opens the channel of a Client or AsyncClient: address, TLS and token, with the environment's defaults."""

    def _connect(self, channel_module, address, timeout, options, token, tls_ca, tls_cert, tls_key, insecure) -> None:
        self.address = with_default_port(address) if address else default_address()
        self.timeout = timeout
        token = os.environ.get("GPUORCH_TOKEN", "") if token is None else token
        if self.address.startswith("unix:"):
            token = ""  # the coordinator's local socket knows the caller from the kernel: no token, no TLS
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        tls_ca = os.environ.get("GPUORCH_TLS_CA", "") if tls_ca is None else tls_ca
        insecure = insecure_from_environment() if insecure is None else insecure
        options = [*CHANNEL_OPTIONS, *(options or [])]
        # Plaintext only to this machine, the same rule the coordinator follows, so a token never
        # crosses the network in the clear: elsewhere TLS, trusting tls_ca or else the system's
        # roots, unless `insecure` says the coordinator serves plaintext on purpose.
        if not self.address.startswith("unix:") and (tls_ca or tls_cert or not (insecure or is_local_address(self.address))):
            credentials = tls.channel_credentials(tls_ca, tls_cert or "", tls_key or "")
            self._open = functools.partial(channel_module.secure_channel, self.address, credentials)
        else:
            self._open = functools.partial(channel_module.insecure_channel, self.address)
        self._channel = self._open(options=options)
        self._stubs = _stubs(self._channel)

    def _unreachable(self, error: grpc.RpcError, probe_error: grpc.RpcError | None) -> GpuorchError:
        """After a deadline: when one call without retries (the probe) cannot connect either, grpc spent the
        deadline retrying a connection, and the coordinator is not reachable rather than slow; the probe's
        error says why (refused, a TLS mismatch). Otherwise the deadline's own error."""
        if probe_error is not None and probe_error.code() == grpc.StatusCode.UNAVAILABLE:
            return from_rpc_error(probe_error, self.address)
        return from_rpc_error(error, self.address)

    def _probe(self):
        """A fresh channel without retries, and the call to make on it to learn why connections fail."""
        channel = self._open(options=[("grpc.enable_retries", 0)])
        call = functools.partial(
            cluster_pb2_grpc.ClusterServiceStub(channel).GetClusterStatus,
            cluster_pb2.GetClusterStatusRequest(),
            timeout=PROBE_SECONDS,
            metadata=self._metadata,
        )
        return channel, call


class Client(_Api, _Channel):
    """Blocking client. Use as a context manager, or call close()."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float = 10.0,
        options: list | None = None,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        insecure: bool | None = None,
    ) -> None:
        """`token` defaults to $GPUORCH_TOKEN, `tls_ca` (a PEM file) to $GPUORCH_TLS_CA and `insecure` to
        $GPUORCH_CLIENT_INSECURE. The channel is TLS unless the address is loopback (or `insecure` is set)."""
        self._connect(grpc, address, timeout, options, token, tls_ca, tls_cert, tls_key, insecure)

    def _error(self, error: grpc.RpcError) -> GpuorchError:
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            return from_rpc_error(error, self.address)
        channel, call = self._probe()
        probe_error = None
        try:
            call()
        except grpc.RpcError as failed:
            probe_error = failed
        finally:
            channel.close()
        return self._unreachable(error, probe_error)

    def _unary(self, service, method, request, extract):
        try:
            return extract(getattr(self._stubs[service], method)(request, timeout=self.timeout, metadata=self._metadata))
        except grpc.RpcError as error:
            raise self._error(error) from None

    def _stream(self, service, method, request, extract):
        call = getattr(self._stubs[service], method)(request, metadata=self._metadata)
        try:
            for response in call:
                yield extract(response)
        except grpc.RpcError as error:
            raise self._error(error) from None
        finally:
            call.cancel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncClient(_Api, _Channel):
    """asyncio client: every method returns an awaitable (streams: an async iterator)."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float = 10.0,
        options: list | None = None,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        insecure: bool | None = None,
    ) -> None:
        """The same arguments as Client's."""
        self._connect(grpc.aio, address, timeout, options, token, tls_ca, tls_cert, tls_key, insecure)

    async def _error(self, error: grpc.RpcError) -> GpuorchError:
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            return from_rpc_error(error, self.address)
        channel, call = self._probe()
        probe_error = None
        try:
            await call()
        except grpc.RpcError as failed:
            probe_error = failed
        finally:
            await channel.close()
        return self._unreachable(error, probe_error)

    def _unary(self, service, method, request, extract):
        async def call():
            try:
                return extract(
                    await getattr(self._stubs[service], method)(request, timeout=self.timeout, metadata=self._metadata)
                )
            except grpc.RpcError as error:
                raise await self._error(error) from None

        return call()

    async def _stream(self, service, method, request, extract):
        call = getattr(self._stubs[service], method)(request, metadata=self._metadata)
        try:
            async for response in call:
                yield extract(response)
        except grpc.RpcError as error:
            raise await self._error(error) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
