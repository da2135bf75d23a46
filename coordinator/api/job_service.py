"""JobService: users' and tools' API for jobs, a thin layer over the JobManager."""

from __future__ import annotations

import asyncio

import grpc

from coordinator import scheduler
from coordinator.api.auth import Action, Guard, StreamQuota, priority_problem, redact_env
from coordinator.control.arrays import ArrayFinished
from coordinator.control.dependencies import DependencyNeverMet
from coordinator.control.job_manager import LOG_CHUNK_BYTES, JobFinished, JobManager, JobNotFound, NoSuchRank, QuotaExceeded
from coordinator.control.usage import usage
from coordinator.rules import job_rules
from coordinator.rules.job_rules import InvalidSpec
from coordinator.store.api import JobQuery
from gpuorch.v1 import job_pb2, job_pb2_grpc
from gpuorch.wire_values import timestamp_seconds

MAX_CLIENT_REQUEST_ID = 128
FOLLOW_POLL_SECONDS = 0.5
LIST_RESPONSE_HEADROOM_BYTES = 1024
"""Room in a ListJobsResponse for what is not jobs (the next page token)."""
CLIENT_RECEIVE_LIMIT_BYTES = 4 * 1024 * 1024
"""grpc's default limit on a message a client receives: gpuctl's and most tools' (grpcurl's too)."""
MAX_TAIL_BYTES = 2**62
"""tail_bytes beyond this means "the whole log" (the offset sent to the agent is a signed 64-bit number)."""


class JobService(job_pb2_grpc.JobServiceServicer):
    def __init__(
        self,
        manager: JobManager,
        guard: Guard | None = None,
        streams: StreamQuota | None = None,
        max_message_bytes: int = 0,
        max_user_priority: int = 100,
    ) -> None:
        self.manager = manager
        self.guard = guard or Guard()
        self.streams = streams or StreamQuota(0)
        self.max_user_priority = max_user_priority
        self.max_list_bytes = max(min(max_message_bytes, CLIENT_RECEIVE_LIMIT_BYTES) - LIST_RESPONSE_HEADROOM_BYTES, 0)
        """A ListJobs page is cut to this many bytes of jobs, so it fits in a message both ends accept (0 = no cut)."""

    def _stream_slot(self, context):
        """Counts an open stream against its client's max_streams_per_client; RESOURCE_EXHAUSTED beyond it."""
        return self.streams.slot(context, self.guard.client_key(context))

    async def _entry(self, job_id: str, context):
        if not job_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job_id is empty")
        try:
            return await self.manager.find(job_id)
        except JobNotFound as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, error.args[0])
        except RuntimeError as error:  # the store could not read the job history
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))

    async def SubmitJob(self, request: job_pb2.SubmitJobRequest, context):
        caller = await self.guard.check(context, Action.SUBMIT)
        if len(request.client_request_id) > MAX_CLIENT_REQUEST_ID:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"client_request_id is longer than {MAX_CLIENT_REQUEST_ID} characters"
            )
        if not request.HasField("spec"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spec is missing")
        if caller.authenticated:
            request.spec.owner = caller.user  # with tokens on, a job belongs to whoever submitted it
        await self._permit_priority(context, caller, request.spec.priority)
        # A job that can never fit is refused now with the numbers, not queued forever (unless the user
        # asks to hold it); a retry of a submission already accepted is answered as before.
        retry = bool(request.client_request_id) and await self._submitted_before(request, context)
        if not request.spec.hold_if_too_big and not retry:
            try:
                job_rules.validate_spec(job_rules.normalized(request.spec))  # a bad field is named before any capacity
            except InvalidSpec as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            too_big = scheduler.too_big_for_cluster(scheduler.request_of_spec(request.spec), self.manager.node_views())
            if too_big:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{too_big}; submit with hold_if_too_big (gpuctl --hold-if-too-big) to queue it anyway",
                )
        try:
            job_id = await self.manager.arrays.submit(request.spec, request.client_request_id)
        except DependencyNeverMet as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        except InvalidSpec as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except QuotaExceeded as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except RuntimeError as error:  # the store could not write it: not acknowledged
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        return job_pb2.SubmitJobResponse(job_id=job_id)

    async def _submitted_before(self, request: job_pb2.SubmitJobRequest, context) -> bool:
        try:
            return await self.manager.history.find_request(request.spec.owner, request.client_request_id) is not None
        except RuntimeError as error:  # the store could not read the job history
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
            raise

    async def _permit_priority(self, context, caller, priority: int) -> None:
        problem = priority_problem(caller, priority, self.max_user_priority)
        if problem is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, problem)

    async def GetJob(self, request: job_pb2.GetJobRequest, context):
        caller = await self.guard.check(context, Action.READ)
        view = self.manager.arrays.view(request.job_id)  # a job array's own view: its tasks counted by state
        if view is not None:
            return job_pb2.GetJobResponse(job=redact_env(view, caller))
        return job_pb2.GetJobResponse(job=redact_env((await self._entry(request.job_id, context)).job, caller))

    async def ListJobs(self, request: job_pb2.ListJobsRequest, context):
        caller = await self.guard.check(context, Action.READ)
        for state in request.states:
            if state not in job_pb2.JobState.values():
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"states contains unknown JobState {state}")
        if request.array_id and self.manager.arrays.view(request.array_id) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"array {request.array_id[:128]!r} does not exist")
        try:
            query = JobQuery(
                owner=request.owner,
                states=frozenset(request.states),
                active_since=timestamp_seconds(request, "active_since"),
                active_until=timestamp_seconds(request, "active_until"),
            )
            if request.tasks or request.array_id:  # every task on its own line, or one array's tasks (in memory)
                found, token = self.manager.arrays.list_tasks(
                    request.states, request.owner, request.page_size, request.page_token, self.max_list_bytes, request.array_id
                )
            else:
                found, token = await self.manager.list(query, request.page_size, request.page_token, self.max_list_bytes)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except RuntimeError as error:  # the store could not read the job history
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        return job_pb2.ListJobsResponse(jobs=[redact_env(job, caller) for job in found], next_page_token=token)

    async def GetUsage(self, request: job_pb2.GetUsageRequest, context):
        await self.guard.check(context, Action.READ)
        try:
            return await usage(self.manager, request)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except RuntimeError as error:  # the store could not read the job history
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))

    async def CancelJob(self, request: job_pb2.CancelJobRequest, context):
        caller = await self.guard.authenticate(context)
        arrays = self.manager.arrays
        if arrays.view(request.job_id) is not None:  # every task of the array not final yet, in one write
            await self.guard.permit(context, caller, Action.CHANGE_JOB, arrays.owner_of(request.job_id))
            try:
                return job_pb2.CancelJobResponse(job=await arrays.cancel(request.job_id))
            except ArrayFinished as error:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        entry = await self._entry(request.job_id, context)
        await self.guard.permit(context, caller, Action.CHANGE_JOB, entry.job.spec.owner)
        try:
            job = await self.manager.cancel(request.job_id)
        except JobFinished as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        return job_pb2.CancelJobResponse(job=job)

    async def SetJobPriority(self, request: job_pb2.SetJobPriorityRequest, context):
        caller = await self.guard.authenticate(context)
        arrays = self.manager.arrays
        if arrays.view(request.job_id) is not None:  # every task of the array not final yet, in one write
            await self.guard.permit(context, caller, Action.CHANGE_JOB, arrays.owner_of(request.job_id))
            await self._permit_priority(context, caller, request.priority)
            try:
                return job_pb2.SetJobPriorityResponse(job=await arrays.set_priority(request.job_id, request.priority))
            except ArrayFinished as error:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        entry = await self._entry(request.job_id, context)
        await self.guard.permit(context, caller, Action.CHANGE_JOB, entry.job.spec.owner)
        await self._permit_priority(context, caller, request.priority)
        try:
            job = await self.manager.set_priority(request.job_id, request.priority)
        except JobFinished as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        return job_pb2.SetJobPriorityResponse(job=job)

    async def WatchJob(self, request: job_pb2.WatchJobRequest, context):
        caller = await self.guard.check(context, Action.READ)
        arrays = self.manager.arrays
        is_array = arrays.view(request.job_id) is not None  # its view after every task's change of state
        entry = None if is_array else await self._entry(request.job_id, context)
        async with self._stream_slot(context):
            watch = arrays.watch(request.job_id) if entry is None else self.manager.history.watch(entry)
            async for job in watch:
                yield job_pb2.WatchJobResponse(job=redact_env(job, caller))

    async def GetJobLogs(self, request: job_pb2.GetJobLogsRequest, context):
        caller = await self.guard.authenticate(context)
        view = self.manager.arrays.view(request.job_id)
        if view is not None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{request.job_id} is an array of {view.array.size} tasks: read one task's logs, e.g. '{request.job_id}"
                f"[{view.spec.array.first}]'",
            )
        entry = await self._entry(request.job_id, context)
        await self.guard.permit(context, caller, Action.READ_PRIVATE, entry.job.spec.owner)
        # Every read counts, not only followed ones: a one-shot read of a large log holds memory as long.
        async with self._stream_slot(context):
            async for response in self._read_logs(request, entry, context):
                yield response

    async def _read_chunk(
        self, request: job_pb2.GetJobLogsRequest, attempt: int, offset: int, context, max_bytes: int = LOG_CHUNK_BYTES
    ):
        try:
            chunk = await self.manager.read_log(request.job_id, request.rank, attempt, offset, max_bytes)
        except NoSuchRank as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except LookupError as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except ConnectionError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        if chunk.error:
            await context.abort(grpc.StatusCode.NOT_FOUND, chunk.error)
        return chunk

    async def _tail_lines_offset(self, request: job_pb2.GetJobLogsRequest, attempt: int, context) -> int:
        """Where the last tail_lines lines begin: reads back from the end a chunk at a time, counting
        newlines (never holding more than one chunk), until enough are found or the log's start."""
        chunk = await self._read_chunk(request, attempt, -LOG_CHUNK_BYTES, context)
        start, left = job_rules.tail_lines_scan(chunk.data, chunk.offset, request.tail_lines, at_end=True)
        while start is None:
            before = max(0, chunk.offset - LOG_CHUNK_BYTES)
            chunk = await self._read_chunk(request, attempt, before, context, chunk.offset - before)
            start, left = job_rules.tail_lines_scan(chunk.data, before, left, at_end=False)
        return start

    async def _read_logs(self, request: job_pb2.GetJobLogsRequest, entry, context):
        offset = -min(request.tail_bytes, MAX_TAIL_BYTES) if request.tail_bytes else 0
        attempt = request.attempt or entry.job.attempt
        if request.tail_lines:  # takes precedence over tail_bytes
            offset = await self._tail_lines_offset(request, attempt, context)
        while True:
            chunk = await self._read_chunk(request, attempt, offset, context)
            if chunk.data:
                yield job_pb2.GetJobLogsResponse(data=chunk.data)
            offset = chunk.offset + len(chunk.data)
            if offset < chunk.file_size:
                continue  # more is already there
            if not request.follow or (not chunk.running and entry.final):
                return
            if not chunk.running and entry.job.attempt != attempt:
                return
            await asyncio.sleep(FOLLOW_POLL_SECONDS)
