"""JobService: users' and tools' API for jobs, a thin layer over the JobManager."""

from __future__ import annotations

import asyncio

import grpc

from coordinator.job_manager import JobFinished, JobManager, JobNotFound
from coordinator.jobs import InvalidSpec
from gpuorch.v1 import job_pb2, job_pb2_grpc

MAX_CLIENT_REQUEST_ID = 128
FOLLOW_POLL_SECONDS = 0.5


class JobService(job_pb2_grpc.JobServiceServicer):
    def __init__(self, manager: JobManager) -> None:
        self.manager = manager

    async def _entry(self, job_id: str, context):
        if not job_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job_id is empty")
        try:
            return self.manager.get(job_id)
        except JobNotFound as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, error.args[0])

    async def SubmitJob(self, request: job_pb2.SubmitJobRequest, context):
        if len(request.client_request_id) > MAX_CLIENT_REQUEST_ID:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"client_request_id is longer than {MAX_CLIENT_REQUEST_ID} characters")
        if not request.HasField("spec"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spec is missing")
        try:
            job_id = await self.manager.submit(request.spec, request.client_request_id)
        except InvalidSpec as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except RuntimeError as error:  # the store could not write it: not acknowledged
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        return job_pb2.SubmitJobResponse(job_id=job_id)

    async def GetJob(self, request: job_pb2.GetJobRequest, context):
        return job_pb2.GetJobResponse(job=(await self._entry(request.job_id, context)).job)

    async def ListJobs(self, request: job_pb2.ListJobsRequest, context):
        for state in request.states:
            if state not in job_pb2.JobState.values():
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"states contains unknown JobState {state}")
        try:
            found, token = self.manager.list(request.states, request.owner, request.page_size, request.page_token)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return job_pb2.ListJobsResponse(jobs=found, next_page_token=token)

    async def CancelJob(self, request: job_pb2.CancelJobRequest, context):
        await self._entry(request.job_id, context)
        try:
            job = await self.manager.cancel(request.job_id)
        except JobFinished as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        return job_pb2.CancelJobResponse(job=job)

    async def SetJobPriority(self, request: job_pb2.SetJobPriorityRequest, context):
        await self._entry(request.job_id, context)
        try:
            job = await self.manager.set_priority(request.job_id, request.priority)
        except JobFinished as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        return job_pb2.SetJobPriorityResponse(job=job)

    async def WatchJob(self, request: job_pb2.WatchJobRequest, context):
        await self._entry(request.job_id, context)
        async for job in self.manager.watch(request.job_id):
            yield job_pb2.WatchJobResponse(job=job)

    async def GetJobLogs(self, request: job_pb2.GetJobLogsRequest, context):
        entry = await self._entry(request.job_id, context)
        offset = -int(request.tail_bytes) if request.tail_bytes else 0
        attempt = request.attempt or entry.job.attempt
        while True:
            try:
                chunk = await self.manager.read_log(request.job_id, request.rank, attempt, offset)
            except LookupError as error:
                await context.abort(grpc.StatusCode.NOT_FOUND if "no rank" not in str(error) else grpc.StatusCode.INVALID_ARGUMENT, str(error))
            except ConnectionError as error:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
            if chunk.error:
                await context.abort(grpc.StatusCode.NOT_FOUND, chunk.error)
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
