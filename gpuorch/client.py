"""The Python SDK: `Client` (blocking) and `AsyncClient` (asyncio) over the gpuorch.v1 API.

Both share one table of methods (`_Api`); they differ only in how a call is
made. Methods return the wire messages (gpuorch.v1.*_pb2) and raise
gpuorch.errors.GpuorchError subclasses.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Self

import grpc

from gpuorch.addresses import DEFAULT_PORT, is_local_address, with_default_port
from gpuorch.array_api import ArrayApi, array_fields
from gpuorch.channels import DEFAULT_ADDRESS, Channels, default_address, insecure_from_environment
from gpuorch.client_usage import UsageCalls
from gpuorch.durations import parse_duration
from gpuorch.errors import GpuorchError
from gpuorch.interactive import InteractiveCalls
from gpuorch.v1 import cluster_pb2, job_pb2
from gpuorch.wire_values import When, every_job, every_job_async, straggler_action, timestamp
from gpuorch.wire_values import enum_values as _enum_values

__all__ = [
    "DEFAULT_ADDRESS", "DEFAULT_PORT", "AsyncClient", "Client", "build_job_spec", "default_address",
    "insecure_from_environment", "is_local_address", "new_request_id", "with_default_port",
]  # fmt: skip


def new_request_id() -> str:
    """A fresh client_request_id: random, so two submissions never share one by accident."""
    return f"gpuctl-{uuid.uuid4().hex}"


def build_job_spec(
    argv: Iterable[str],
    *,
    gpus: int = 1,
    requirements: Mapping[str, Any] | job_pb2.JobRequirements | None = None,
    env: Mapping[str, str] | None = None,
    time_limit: str | int | None = None,
    on_straggler: str | int = "flag",
    **fields: Any,
) -> job_pb2.JobSpec:
    """A JobSpec from keyword arguments named like its fields. `time_limit` sets time_limit_seconds from
    seconds or a duration such as "90m", "2h", "1h30m" or "01:30:00" (ValueError naming it otherwise).
    `on_straggler` is "flag" or "restart" (gpuctl's --on-straggler) or a StragglerAction; the rest of
    --idle-timeout, --idle-exempt and --gpu-memory-fraction are idle_timeout_minutes=, idle_exempt=True and
    gpu_memory_fraction=."""
    fields["on_straggler"] = straggler_action(on_straggler)
    if time_limit is not None:
        fields["time_limit_seconds"] = time_limit if isinstance(time_limit, int) else parse_duration(time_limit)
    fields = array_fields(fields)  # array="0-99%8", after=["j-...:ok"] (gpuorch/array_api.py)
    if isinstance(requirements, Mapping):
        requirements = job_pb2.JobRequirements(**requirements)
    return job_pb2.JobSpec(argv=list(argv), gpus=gpus, requirements=requirements, env=dict(env or {}), **fields)


class _Api(UsageCalls, ArrayApi):
    """Every RPC of the public API once (GetUsageHistory and WhoAmI in UsageCalls, arrays in ArrayApi); `_unary`/`_stream`
    decide sync or async."""

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

    def get_node(self, node_id: str, include_telemetry_history: bool = False):
        request = cluster_pb2.GetNodeRequest(node_id=node_id, include_telemetry_history=include_telemetry_history)
        return self._unary("cluster", "GetNode", request, lambda r: r.node)

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

    def list_jobs(
        self, states: Iterable[str | int] = (), owner: str = "", page_size: int = 0, page_token: str = "", *,
        since: When = None, until: When = None,
    ):  # fmt: skip
        """One page of jobs, newest first: returns (jobs, next_page_token). `since`/`until` (wall seconds or
        datetimes) keep the jobs that were in the system at some time between them (job history, like sacct)."""
        states = _enum_values(job_pb2.JobState, "JOB_STATE_", states)
        request = job_pb2.ListJobsRequest(states=states, owner=owner, page_size=page_size, page_token=page_token,
                                          active_since=timestamp(since), active_until=timestamp(until))  # fmt: skip
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


class Client(_Api, InteractiveCalls, Channels):
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
        """`address` is HOST[:PORT] or a comma-separated list of them (the leader is followed, see
        gpuorch.channels); it defaults to $GPUORCH_COORDINATOR. `token` defaults to $GPUORCH_TOKEN,
        `tls_ca` (a PEM file) to $GPUORCH_TLS_CA and `insecure` to $GPUORCH_CLIENT_INSECURE. A
        channel is TLS unless its address is loopback (or `insecure` is set)."""
        self._connect(grpc, address, timeout, options, token, tls_ca, tls_cert, tls_key, insecure)

    def _error(self, error: grpc.RpcError, link) -> GpuorchError:
        probe_error = None
        if self._needs_probe(error):
            channel, call = self._probe(link)
            try:
                call()
            except grpc.RpcError as failed:
                probe_error = failed
            finally:
                channel.close()
        return self._failure(error, link, probe_error)

    def _unary(self, service, method, request, extract):
        if self._must_locate_leader(service, method):
            self._locate_leader()
        attempts = self._attempts(service, method, self.timeout)
        while True:
            link = attempts.link()
            try:
                response = getattr(link.stubs[service], method)(request, timeout=attempts.remaining(), metadata=link.metadata)
            except grpc.RpcError as error:
                delay = attempts.retry_delay(error)
                if delay is None:
                    raise self._error(error, link) from None
                time.sleep(delay)
                continue
            attempts.served()
            return extract(response)

    def _locate_leader(self) -> None:
        service, method, request = self._locating_request()
        try:
            self._unary(service, method, request, lambda response: response)
        except GpuorchError as error:
            if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise

    def _stream(self, service, method, request, extract):
        attempts = self._attempts(service, method, None)
        while True:
            link = attempts.link()
            call = getattr(link.stubs[service], method)(request, metadata=link.metadata)
            received = False
            try:
                for response in call:
                    if not received:
                        received = True
                        attempts.served()
                    yield extract(response)
                attempts.served()
                return
            except grpc.RpcError as error:
                delay = None if received else attempts.retry_delay(error)
                if delay is None:
                    raise self._error(error, link) from None
            finally:
                call.cancel()
            time.sleep(delay)

    def iter_jobs(self, page_size: int = 0, **filters: Any):
        """Every job list_jobs(**filters) matches, newest first, fetching page after page."""
        return every_job(self, page_size, **filters)

    def close(self) -> None:
        for link in self._links.values():
            link.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncClient(_Api, Channels):
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

    async def _error(self, error: grpc.RpcError, link) -> GpuorchError:
        probe_error = None
        if self._needs_probe(error):
            channel, call = self._probe(link)
            try:
                await call()
            except grpc.RpcError as failed:
                probe_error = failed
            finally:
                await channel.close()
        return self._failure(error, link, probe_error)

    def _unary(self, service, method, request, extract):
        async def call():
            if self._must_locate_leader(service, method):
                await self._locate_leader()
            attempts = self._attempts(service, method, self.timeout)
            while True:
                link = attempts.link()
                try:
                    response = await getattr(link.stubs[service], method)(
                        request, timeout=attempts.remaining(), metadata=link.metadata
                    )
                except grpc.RpcError as error:
                    delay = attempts.retry_delay(error)
                    if delay is None:
                        raise await self._error(error, link) from None
                    await asyncio.sleep(delay)
                    continue
                attempts.served()
                return extract(response)

        return call()

    async def _locate_leader(self) -> None:
        service, method, request = self._locating_request()
        try:
            await self._unary(service, method, request, lambda response: response)
        except GpuorchError as error:
            if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise

    async def _stream(self, service, method, request, extract):
        attempts = self._attempts(service, method, None)
        while True:
            link = attempts.link()
            call = getattr(link.stubs[service], method)(request, metadata=link.metadata)
            received = False
            try:
                async for response in call:
                    if not received:
                        received = True
                        attempts.served()
                    yield extract(response)
                attempts.served()
                return
            except grpc.RpcError as error:
                delay = None if received else attempts.retry_delay(error)
                if delay is None:
                    raise await self._error(error, link) from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    def iter_jobs(self, page_size: int = 0, **filters: Any):
        """Every job list_jobs(**filters) matches, newest first (an async iterator), fetching page after page."""
        return every_job_async(self, page_size, **filters)

    async def close(self) -> None:
        for link in self._links.values():
            await link.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
