"""ClusterService: operators' view and control of nodes."""

from __future__ import annotations

import grpc

from coordinator.api.auth import Action, Guard
from coordinator.control.cluster_view import ClusterView
from coordinator.model.usage import UsageHistory
from coordinator.observe.usage_sampler import usage_problem, usage_response
from gpuorch.v1 import cluster_pb2, cluster_pb2_grpc

MAX_REASON_LENGTH = 1024


class ClusterService(cluster_pb2_grpc.ClusterServiceServicer):
    def __init__(
        self, cluster: ClusterView, epoch: int, guard: Guard | None = None, jobs_by_state=None, persist_drain=None
    ) -> None:
        self.cluster = cluster
        self.epoch = epoch
        self.guard = guard or Guard()
        self.jobs_by_state = jobs_by_state
        """Optional callable returning {state name: count}, from the job manager."""
        self.persist_drain = persist_drain
        """Optional coroutine function (node_id, reason or None) that makes a drain outlive restarts."""
        self.usage: UsageHistory | None = None
        """The usage history GetUsageHistory answers from; None answers an empty one."""

    async def _node(self, node_id: str, context: grpc.aio.ServicerContext):
        if not node_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node_id is empty")
        try:
            return self.cluster.get(node_id)
        except KeyError as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, error.args[0])

    async def ListNodes(self, request: cluster_pb2.ListNodesRequest, context):
        await self.guard.check(context, Action.READ)
        for state in request.states:
            if state not in cluster_pb2.NodeState.values():
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"states contains unknown NodeState {state}")
        return cluster_pb2.ListNodesResponse(nodes=self.cluster.list_nodes(request.states))

    async def GetNode(self, request: cluster_pb2.GetNodeRequest, context):
        await self.guard.check(context, Action.READ)
        node = await self._node(request.node_id, context)
        return cluster_pb2.GetNodeResponse(node=self.cluster.node_proto(node, request.include_telemetry_history))

    async def GetClusterStatus(self, request, context):
        await self.guard.check(context, Action.READ)
        status = self.cluster.status()
        status.coordinator_epoch = self.epoch
        if self.jobs_by_state is not None:
            for name, count in self.jobs_by_state().items():
                status.jobs_by_state[name] = count
        return cluster_pb2.GetClusterStatusResponse(status=status)

    async def DrainNode(self, request: cluster_pb2.DrainNodeRequest, context):
        await self.guard.check(context, Action.OPERATE)
        if len(request.reason) > MAX_REASON_LENGTH:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"reason is {len(request.reason)} characters; at most {MAX_REASON_LENGTH}"
            )
        await self._node(request.node_id, context)
        node = self.cluster.drain(request.node_id, request.reason)
        if self.persist_drain is not None:
            await self.persist_drain(node.node_id, node.drain_reason)
        return cluster_pb2.DrainNodeResponse(node=self.cluster.node_proto(node))

    async def ResumeNode(self, request: cluster_pb2.ResumeNodeRequest, context):
        await self.guard.check(context, Action.OPERATE)
        await self._node(request.node_id, context)
        node = self.cluster.resume(request.node_id)
        if self.persist_drain is not None:
            await self.persist_drain(node.node_id, None)
        return cluster_pb2.ResumeNodeResponse(node=self.cluster.node_proto(node))

    async def GetUsageHistory(self, request: cluster_pb2.GetUsageHistoryRequest, context):
        await self.guard.check(context, Action.READ)
        problem = usage_problem(request)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        now = self.cluster.clock.wall()
        usage = self.usage if self.usage is not None else UsageHistory(1.0, now)
        return usage_response(usage, request, now)

    async def WhoAmI(self, request: cluster_pb2.WhoAmIRequest, context):
        caller = await self.guard.authenticate(context)
        return cluster_pb2.WhoAmIResponse(user=caller.user, role=caller.role, authenticated=caller.authenticated)
