"""Prometheus metrics: a real coordinator and agents with --metrics-listen, scraped over HTTP.

The tests that share `cluster` (module scope: one coordinator, agents n1 and n2 with
2 simulated GPUs each) compare values before and after what they do, so they hold
whatever ran before them; the last one kills n2.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.observe.rpc_metrics import RpcMetrics
from gpuorch.errors import NotFound
from gpuorch.v1 import job_pb2
from tests.harness import REPO, LocalCluster, free_port, wait_for

JOB_SERVICE = "gpuorch.v1.JobService"
SUBMIT = {"grpc_type": "unary", "grpc_service": JOB_SERVICE, "grpc_method": "SubmitJob"}
GET_JOB = {"grpc_type": "unary", "grpc_service": JOB_SERVICE, "grpc_method": "GetJob"}
CONNECT = {"grpc_type": "bidi_stream", "grpc_service": "gpuorch.v1.AgentService", "grpc_method": "Connect"}
MIB = 1024 * 1024


class Scrape:
    """One /metrics page, parsed by prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[sample.name].append((sample.labels, sample.value))
        self.names = {match.group(1) for match in re.finditer(r"^([A-Za-z_:][A-Za-z0-9_:]*)[{ ]", text, re.MULTILINE)}
        """The names of the series on the page, as Prometheus stores them."""

    def series(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        # prometheus_client's parser appends _total to counters named without it (DCGM_FI_DEV_ECC_*_TOTAL).
        found = self.samples.get(name) or (self.samples.get(name + "_total", []) if self.types.get(name) == "counter" else [])
        return [(have, value) for have, value in found if all(have.get(k) == v for k, v in labels.items())]

    def value(self, name: str, default: float | None = None, **labels: str) -> float:
        """The one sample of `name` with these labels; `default` when there is none (else an assertion fails)."""
        found = self.series(name, **labels)
        if not found and default is not None:
            return default
        assert len(found) == 1, f"expected one {name}{labels}, found {found}"
        return found[0][1]


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return Scrape(response.read().decode())


def wait_scrape(port: int, predicate, what: str, timeout: float = 15.0) -> Scrape:
    def attempt():
        page = scrape(port)
        return page if predicate(page) else None

    return wait_for(attempt, timeout=timeout, interval=0.1, what=what)


def wait_job(client, job_id: str, state: int, timeout: float = 30.0):
    name = job_pb2.JobState.Name(state)
    return wait_for(lambda: (job := client.get_job(job_id)).state == state and job, timeout=timeout, what=f"{job_id} {name}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One coordinator and two agents (n1, n2; 2 simulated GPUs each), every one serving /metrics."""
    local = LocalCluster(tmp_path_factory.mktemp("metrics"))
    local.metrics_port = free_port()
    local.agent_metrics_ports = {"n1": free_port(), "n2": free_port()}
    try:
        local.start_coordinator(
            "--metrics-listen", f"127.0.0.1:{local.metrics_port}",
            "--stop-grace-period", "1",
            "--node-grace-period", "1",
        )  # fmt: skip
        for node_id, port in local.agent_metrics_ports.items():
            local.add_agent(node_id, 2, "--metrics-listen", f"127.0.0.1:{port}")
        local.wait_for_nodes(2)
        yield local
    finally:
        local.stop()


def test_coordinator_reports_nodes_and_every_gpu_like_dcgm_exporter(cluster):
    expected = {}
    for node in cluster.client().list_nodes():
        for device in node.devices:
            expected[device.uuid] = (node.node_id, node.hostname, device.index, device.name, device.memory_total_bytes)
    assert len(expected) == 4
    page = wait_scrape(
        cluster.metrics_port,
        lambda page: {labels["UUID"] for labels, _ in page.series("DCGM_FI_DEV_GPU_TEMP")} == set(expected),
        "a temperature for every GPU",
    )
    assert page.value("gpuorch_nodes", state="READY") == 2
    assert sum(value for labels, value in page.series("gpuorch_nodes") if labels["state"] != "READY") == 0
    assert page.value("gpuorch_node_state", node="n1", state="READY") == 1
    assert page.value("gpuorch_node_state", node="n1", state="DOWN") == 0
    assert sum(value for _, value in page.series("gpuorch_gpus")) == 4
    assert page.value("gpuorch_gpus", node_state="READY", healthy="true", allocated="false") == 4
    assert page.types["DCGM_FI_DEV_GPU_TEMP"] == "gauge"
    for uuid, (node_id, hostname, index, model, memory_total) in expected.items():
        labels = {
            "UUID": uuid,
            "node": node_id,
            "gpu": str(index),
            "device": f"nvidia{index}",
            "modelName": model,
            "Hostname": hostname,
        }
        assert 20 <= page.value("DCGM_FI_DEV_GPU_TEMP", **labels) <= 100
        assert 0 <= page.value("DCGM_FI_DEV_GPU_UTIL", **labels) <= 100
        assert page.value("DCGM_FI_DEV_POWER_USAGE", **labels) > 0
        assert page.value("DCGM_FI_DEV_FB_TOTAL", **labels) == memory_total / MIB
        used, free = page.value("DCGM_FI_DEV_FB_USED", **labels), page.value("DCGM_FI_DEV_FB_FREE", **labels)
        assert used > 0 and math.isclose(used + free, memory_total / MIB, rel_tol=1e-9)
        assert page.value("DCGM_FI_DEV_XID_ERRORS", **labels) == 0
        assert page.value("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", **labels) == 0
        # The simulated GPUs see a rare corrected (single-bit) error at random, as real ones do: a count, not 0.
        corrected = page.value("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", **labels)
        assert corrected >= 0 and corrected == int(corrected)
        assert page.value("gpuorch_gpu_xid_errors_total", **labels) == 0
        assert page.value("gpuorch_gpu_healthy", **labels) == 1
    assert page.types["gpuorch_gpu_xid_errors"] == "counter"
    # dcgm-exporter's exact names, types and units, so its dashboards and alerts apply.
    assert page.types["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"] == "counter" and "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL" in page.names
    assert page.types["DCGM_FI_DEV_FB_USED"] == page.types["DCGM_FI_DEV_XID_ERRORS"] == "gauge"
    # Agents heartbeat every second: the coordinator's own ingest statistics show them.
    page = wait_scrape(
        cluster.metrics_port, lambda page: page.value("gpuorch_heartbeats_per_second") > 1, "heartbeats to be counted"
    )
    p50, p99 = (page.value("gpuorch_heartbeat_lag_seconds", quantile=q) for q in ("0.5", "0.99"))
    assert 0 <= p50 <= p99 < 1.0
    assert page.value("gpuorch_node_heartbeat_age_seconds", node="n2") < 3
    assert page.value("process_resident_memory_bytes") > 0


def test_a_succeeded_job_shows_in_jobs_placements_and_latencies(cluster):
    client = cluster.client()
    before = scrape(cluster.metrics_port)
    job_id = client.submit_job(argv=[sys.executable, "-c", "pass"], gpus=1)
    wait_job(client, job_id, job_pb2.JOB_STATE_SUCCEEDED)
    page = scrape(cluster.metrics_port)
    assert page.value("gpuorch_jobs", state="SUCCEEDED") == before.value("gpuorch_jobs", state="SUCCEEDED") + 1
    assert page.value("gpuorch_placements_total") == before.value("gpuorch_placements_total") + 1
    assert page.types["gpuorch_placements"] == "counter"
    for quantile in ("0.5", "0.99"):
        assert 0 < page.value("gpuorch_scheduling_decision_seconds", quantile=quantile) < 5
        assert 0 < page.value("gpuorch_launch_latency_seconds", quantile=quantile) < 30
    submitted = page.value("grpc_server_handled_total", **SUBMIT, grpc_code="OK")
    assert submitted == before.value("grpc_server_handled_total", 0, **SUBMIT, grpc_code="OK") + 1


def test_rpcs_are_counted_by_method_and_status_code_once_per_rpc(cluster):
    """With go-grpc-prometheus's names, labels and code spellings, so the gRPC ecosystem's dashboards and alerts apply."""
    client = cluster.client()
    before = scrape(cluster.metrics_port)
    with pytest.raises(NotFound):
        client.get_job("j-does-not-exist")
    page = scrape(cluster.metrics_port)
    not_found = page.value("grpc_server_handled_total", **GET_JOB, grpc_code="NotFound")
    assert not_found == before.value("grpc_server_handled_total", 0, **GET_JOB, grpc_code="NotFound") + 1
    assert page.value("grpc_server_started_total", **GET_JOB) == before.value("grpc_server_started_total", 0, **GET_JOB) + 1
    assert page.types["grpc_server_handled"] == "counter"
    assert {label for labels, _ in page.series("grpc_server_handled_total") for label in labels} == {
        "grpc_type", "grpc_service", "grpc_method", "grpc_code"
    }  # fmt: skip
    # Each agent's stream is one RPC, however many heartbeats it carried; it has not ended yet.
    assert page.value("grpc_server_started_total", **CONNECT) == 2
    assert page.series("grpc_server_handled_total", **CONNECT) == []


def test_a_job_that_does_not_fit_shows_in_the_queue(cluster):
    client = cluster.client()
    job_id = client.submit_job(argv=[sys.executable, "-c", "pass"], gpus=8, hold_if_too_big=True)  # the cluster has 4
    first = wait_scrape(cluster.metrics_port, lambda page: page.value("gpuorch_queue_length") == 1, "the job to be queued")
    assert first.value("gpuorch_queue_pending_gpus") == 8
    assert first.value("gpuorch_jobs", state="PENDING") == 1
    time.sleep(0.5)
    second = scrape(cluster.metrics_port)
    assert (
        second.value("gpuorch_queue_oldest_pending_age_seconds") >= first.value("gpuorch_queue_oldest_pending_age_seconds") + 0.4
    )
    client.cancel_job(job_id)
    page = wait_scrape(cluster.metrics_port, lambda page: page.value("gpuorch_queue_length") == 0, "the queue to empty")
    assert page.value("gpuorch_queue_oldest_pending_age_seconds") == 0
    assert page.value("gpuorch_queue_pending_gpus") == 0


def test_restarts_are_counted_by_reason(cluster):
    client = cluster.client()
    before = scrape(cluster.metrics_port).value("gpuorch_job_restarts_total", 0, reason="rank_exit")
    job_id = client.submit_job(argv=[sys.executable, "-c", "raise SystemExit(3)"], gpus=1, max_restarts=1)
    wait_job(client, job_id, job_pb2.JOB_STATE_FAILED)
    page = scrape(cluster.metrics_port)
    assert page.value("gpuorch_job_restarts_total", reason="rank_exit") == before + 1
    assert page.types["gpuorch_job_restarts"] == "counter"


def test_agents_report_their_connection_heartbeats_and_running_ranks(cluster):
    ports = cluster.agent_metrics_ports
    for node_id, port in ports.items():
        page = wait_scrape(port, lambda page: page.value("gpuorch_agent_heartbeats_sent_total") > 0, f"{node_id} to heartbeat")
        assert page.value("gpuorch_agent_connected") == 1
        assert page.value("gpuorch_agent_registered") == 1
        assert page.value("gpuorch_agent_reconnects_total") == 0
        assert page.value("gpuorch_agent_running_ranks") == 0
        assert page.value("gpuorch_agent_info", node=node_id) == 1
        sent = page.value("gpuorch_agent_heartbeats_sent_total")
        wait_scrape(
            port, lambda page, sent=sent: page.value("gpuorch_agent_heartbeats_sent_total") > sent, f"{node_id} to send more"
        )
    client = cluster.client()
    job_id = client.submit_job(argv=[sys.executable, "-c", "import time; time.sleep(60)"], gpus=4, gpus_per_node=2)
    for node_id, port in ports.items():
        wait_scrape(port, lambda page: page.value("gpuorch_agent_running_ranks") == 2, f"2 ranks running on {node_id}")
    page = scrape(cluster.metrics_port)
    assert page.value("gpuorch_gpus", node_state="READY", healthy="true", allocated="true") == 4
    held = [labels for labels, value in page.series("gpuorch_gpu_allocated") if value == 1]
    assert {labels["node"] for labels in held} == {"n1", "n2"} and len(held) == 4
    assert all(labels["job"] == job_id and labels["owner"] == client.get_job(job_id).spec.owner for labels in held), held
    client.cancel_job(job_id)
    for node_id, port in ports.items():
        wait_scrape(port, lambda page: page.value("gpuorch_agent_running_ranks") == 0, f"ranks on {node_id} to stop")
    page = wait_scrape(
        cluster.metrics_port,
        lambda page: all(value == 0 for _, value in page.series("gpuorch_gpu_allocated")),
        "the GPUs to be free",
    )
    free = [labels for labels, _ in page.series("gpuorch_gpu_allocated")]
    assert len(free) == 4 and all("job" not in labels and "owner" not in labels for labels in free), "a free GPU carries no job"


def test_the_page_is_gzipped_when_asked_and_served_only_at_metrics(cluster):
    request = urllib.request.Request(f"http://127.0.0.1:{cluster.metrics_port}/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        page = Scrape(gzip.decompress(response.read()).decode())
    assert page.value("gpuorch_nodes", state="READY") == 2
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/nothing-here", timeout=5)
    assert error.value.code == 404


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (enough PromQL for a dashboard's expressions)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # grouping label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        following = expr[match.end() :].lstrip()
        if following.startswith("("):
            continue  # a function or aggregation
        if match.group() in {
            "and",
            "or",
            "unless",
            "bool",
            "offset",
            "by",
            "without",
            "on",
            "ignoring",
            "group_left",
            "group_right",
        }:
            continue
        if re.fullmatch(r"\d+(\.\d+)?[smhdwy]?|e\d+", match.group()):
            continue
        names.add(match.group())
    return names


def test_promql_metric_names_finds_only_metrics():
    expr = (
        'sum by (grpc_method, grpc_code) (rate(grpc_server_handled_total{grpc_code!="OK",grpc_method=~"a|b"}[5m])) '
        "and on (instance) up > 0.5"
    )
    assert promql_metric_names(expr) == {"grpc_server_handled_total", "up"}


def test_dashboard_queries_only_metrics_the_coordinator_exports(cluster):
    dashboard = json.loads((REPO / "dashboards" / "gpuorch.json").read_text())
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [panel for top in dashboard["panels"] for panel in [top, *top.get("panels", [])] if panel["type"] != "row"]
    page = scrape(cluster.metrics_port)
    exported = page.names
    used = set()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = promql_metric_names(target["expr"])
            assert names, f"{panel['title']}: {target['expr']!r} selects no metric"
            assert names <= exported, f"{panel['title']}: {sorted(names - exported)} are not exported by the coordinator"
            labels = {label for name in names for have, _ in page.series(name) for label in have} | {"instance", "job"}
            wanted = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", target["expr"]))
            for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", target["expr"]):
                wanted |= {label.strip() for label in group.split(",") if label.strip()}
            assert wanted <= labels, f"{panel['title']}: {target['expr']!r} uses labels {sorted(wanted - labels)} no series has"
            used |= names
    node_query = variables["node"]["query"]["query"]
    assert re.fullmatch(r"label_values\((\w+), node\)", node_query).group(1) in exported
    required = {
        "gpuorch_nodes", "gpuorch_gpus", "gpuorch_jobs", "gpuorch_queue_length", "gpuorch_queue_oldest_pending_age_seconds",
        "gpuorch_scheduling_decision_seconds", "gpuorch_job_restarts_total", "gpuorch_heartbeat_lag_seconds",
        "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_FB_USED",
    }  # fmt: skip
    assert required <= used, f"the dashboard has no panel for {sorted(required - used)}"


def test_the_readme_names_the_metrics_and_labels_that_are_exported(cluster):
    readme = (REPO / "README.md").read_text()
    named = re.findall(r"`((?:gpuorch|grpc)_\w+)\{([\w,]+)\}`", readme)
    assert ("grpc_server_handled_total", "grpc_type,grpc_service,grpc_method,grpc_code") in named
    page = scrape(cluster.metrics_port)
    for name, labels in named:
        assert name in page.names, f"the README names {name}, which is not exported"
        found = page.series(name)
        if found:  # a counter with nothing counted yet (restarts) has no series to look at
            have = {label for series_labels, _ in found for label in series_labels}
            assert set(labels.split(",")) <= have, f"the README gives {name} labels {labels}; its series have {sorted(have)}"


def test_a_lost_node_changes_state_counts_and_its_telemetry_disappears(cluster):
    """Runs last: it kills n2."""
    n2_uuids = {device.uuid for device in cluster.client().get_node("n2").devices}
    cluster.agents["n2"].kill()
    page = wait_scrape(cluster.metrics_port, lambda page: page.value("gpuorch_nodes", state="DOWN") == 1, "n2 to be DOWN")
    assert page.value("gpuorch_nodes", state="READY") == 1
    assert page.value("gpuorch_node_state", node="n2", state="DOWN") == 1
    assert sum(value for _, value in page.series("gpuorch_gpus", node_state="DOWN")) == 2
    assert page.value("gpuorch_gpus", node_state="READY", healthy="true", allocated="false") == 2
    temperatures = {labels["UUID"] for labels, _ in page.series("DCGM_FI_DEV_GPU_TEMP")}
    assert len(temperatures) == 2 and not temperatures & n2_uuids, "a DOWN node's last readings are not current"
    assert {labels["UUID"] for labels, _ in page.series("gpuorch_gpu_healthy", node="n2")} == n2_uuids


# -- start-up errors ------------------------------------------------------------------------------


def run_daemon(module: str, *argv: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, "--state-dir", str(tmp_path / module), "--log-format", "json", *argv],
        capture_output=True, text=True, timeout=30, cwd=REPO, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("module", ["coordinator.main", "agent.main"])
@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:99999", "127.0.0.1:http"])
def test_a_bad_metrics_address_is_a_one_line_error(module, address, tmp_path):
    extra = ["--simulate-gpus", "1"] if module == "agent.main" else ["--listen", f"127.0.0.1:{free_port()}"]
    result = run_daemon(module, "--metrics-listen", address, *extra, tmp_path=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    prefix = "gpuorch-coordinator: " if module == "coordinator.main" else "gpuorch-agent: "
    assert len(lines) == 1 and lines[0].startswith(prefix + "metrics_listen") and repr(address) in lines[0], result.stderr


@pytest.mark.parametrize("module", ["coordinator.main", "agent.main"])
def test_a_metrics_port_in_use_is_a_one_line_error(module, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        extra = ["--simulate-gpus", "1"] if module == "agent.main" else ["--listen", f"127.0.0.1:{free_port()}"]
        result = run_daemon(module, "--metrics-listen", address, *extra, tmp_path=tmp_path)
    assert result.returncode == 1
    # Start-up logs may come before it; the error is one line of its own, the last.
    prefix = "gpuorch-coordinator: " if module == "coordinator.main" else "gpuorch-agent: "
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith(prefix)]
    assert errors == [f"{prefix}cannot serve metrics on {address}: Address already in use"], result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]


# -- the RPC interceptor, in process --------------------------------------------------------------


async def test_the_interceptor_records_the_status_code_clients_see():
    async def ok(request, context):
        return b"ok"

    async def missing(request, context):
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    async def set_code(request, context):
        context.set_code(grpc.StatusCode.ALREADY_EXISTS)
        return b""

    async def crash(request, context):
        raise ValueError("a bug")

    async def slow(request, context):
        await asyncio.sleep(10)
        return b""

    async def stream(request, context):
        yield b"a"
        yield b"b"

    async def stream_abort(request, context):
        yield b"a"
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "enough")

    metrics = RpcMetrics()
    server = grpc.aio.server(interceptors=[metrics])
    unary = {f.__name__: grpc.unary_unary_rpc_method_handler(f) for f in (ok, missing, set_code, crash, slow)}
    streaming = {f.__name__: grpc.unary_stream_rpc_method_handler(f) for f in (stream, stream_abort)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {**unary, **streaming}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    seen = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for name in ("ok", "ok", "missing", "set_code", "crash", "slow", "nope"):
                try:
                    await channel.unary_unary(f"/t.S/{name}")(b"", timeout=0.5)
                    seen[name] = "OK"
                except grpc.aio.AioRpcError as error:
                    seen[name] = error.code().name
            for name in ("stream", "stream_abort"):
                try:
                    assert [message async for message in channel.unary_stream(f"/t.S/{name}")(b"")] == [b"a", b"b"]
                    seen[name] = "OK"
                except grpc.aio.AioRpcError as error:
                    seen[name] = error.code().name
        await asyncio.sleep(0.2)  # the cancelled handler's end is recorded after the client gave up
    finally:
        await server.stop(None)
    assert seen == {
        "ok": "OK", "missing": "NOT_FOUND", "set_code": "ALREADY_EXISTS", "crash": "UNKNOWN", "slow": "DEADLINE_EXCEEDED",
        "nope": "UNIMPLEMENTED", "stream": "OK", "stream_abort": "RESOURCE_EXHAUSTED",
    }  # fmt: skip
    assert metrics.handled == {
        ("/t.S/ok", "OK"): 2,
        ("/t.S/missing", "NOT_FOUND"): 1,
        ("/t.S/set_code", "ALREADY_EXISTS"): 1,
        ("/t.S/crash", "UNKNOWN"): 1,
        ("/t.S/slow", "DEADLINE_EXCEEDED"): 1,
        ("unknown", "UNIMPLEMENTED"): 1,
        ("/t.S/stream", "OK"): 1,
        ("/t.S/stream_abort", "RESOURCE_EXHAUSTED"): 1,
    }
    assert metrics.started["/t.S/ok"] == 2 and sum(metrics.started.values()) == 9


class AbortingContext:
    """A handler's context whose abort behaves as grpc's does: the status goes to the client, then AbortError is raised.

    `counts_when_sent` keeps the interceptor's counts at the moment the client could have seen the status.
    """

    def __init__(self, metrics: RpcMetrics) -> None:
        self.metrics = metrics
        self.sent_code: grpc.StatusCode | None = None
        self.counts_when_sent: list[dict[tuple[str, str], int]] = []

    async def abort(self, code, details="", trailing_metadata=()):
        self.sent_code = code
        self.counts_when_sent.append(dict(self.metrics.handled))
        raise grpc.aio.AbortError(details)

    def code(self):
        return self.sent_code

    def time_remaining(self):
        return None


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "server_stream"])
async def test_an_aborted_rpc_is_counted_before_its_status_reaches_the_client(streaming):
    """A client that scrapes /metrics as soon as its RPC fails sees that RPC counted (CI once saw it missing)."""
    metrics = RpcMetrics()

    async def missing(request, context):
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    async def missing_stream(request, context):
        yield b"a"
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    if streaming:
        handler = grpc.unary_stream_rpc_method_handler(missing_stream)
    else:
        handler = grpc.unary_unary_rpc_method_handler(missing)

    async def continuation(details):
        return handler

    wrapped = await metrics.intercept_service(continuation, SimpleNamespace(method="/t.S/missing", invocation_metadata=()))
    context = AbortingContext(metrics)
    with pytest.raises(grpc.aio.AbortError):
        if streaming:
            assert [message async for message in wrapped.unary_stream(b"", context)] == [b"a"]
        else:
            await wrapped.unary_unary(b"", context)
    assert context.counts_when_sent == [{("/t.S/missing", "NOT_FOUND"): 1}]
    assert metrics.handled == {("/t.S/missing", "NOT_FOUND"): 1}  # and not counted again when the raise passes
    assert metrics.started == {"/t.S/missing": 1}
