"""Tokens, roles, TLS and mutual TLS, loopback-only plaintext, and per-user limits.

The rules (coordinator/api/auth.py) are tested as pure functions; the rest against real
coordinator and agent processes on loopback, with certificates made by
scripts/make-certs.sh as an operator would make them.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import gpuorch
from agent.settings import AgentSettings
from coordinator.api.auth import (
    OPEN_ACCESS,
    Action,
    Caller,
    StreamQuota,
    TokensFileError,
    authenticate,
    authorize,
    bearer_token,
    node_identity_problem,
    parse_tokens,
)
from coordinator.settings import CoordinatorSettings
from gpuorch.cli import new_token
from gpuorch.client import is_local_address
from gpuorch.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable
from gpuorch.tls import is_loopback_host
from gpuorch.v1 import cluster_pb2, job_pb2
from tests.harness import REPO, LocalCluster, free_port, grpcurl_binary, wait_for

TOKENS = {"ops": ("ops-token-0123456789", "admin"), "alice": ("alice-token-abcdef", "user"), "bob": ("bob-token-zyxwvu", "user")}


def tokens_entry(user: str, token: str, role: str) -> str:
    return f'[[tokens]]\nuser = "{user}"\nrole = "{role}"\nsha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n\n'


def write_tokens(path, tokens=TOKENS) -> None:
    path.write_text("".join(tokens_entry(user, token, role) for user, (token, role) in tokens.items()))


def entries():
    document = {
        "tokens": [{"user": u, "role": r, "sha256": hashlib.sha256(t.encode()).hexdigest()} for u, (t, r) in TOKENS.items()]
    }
    return parse_tokens(document, "test")


# --- rules -------------------------------------------------------------------------------------------


def test_a_token_authenticates_as_its_user_and_role():
    table = entries()
    assert authenticate(table, "alice-token-abcdef") == Caller("alice", "user")
    assert authenticate(table, "ops-token-0123456789") == Caller("ops", "admin")
    assert authenticate(table, "alice-token-abcdeF") is None
    assert authenticate(table, "") is None
    assert authenticate((), "alice-token-abcdef") is None


@pytest.mark.parametrize(
    "document, message",
    [
        ({"tokens": [{"user": "a", "role": "root", "sha256": "00" * 32}]}, "entry 1 (a): role must be 'admin' or 'user'"),
        ({"tokens": [{"user": "a", "role": "user", "sha256": "abc"}]}, "entry 1 (a): sha256 must be 64 hex digits"),
        ({"tokens": [{"user": "a", "role": "user", "sha256": "zz" * 32}]}, "sha256 must be 64 hex digits"),
        ({"tokens": [{"role": "user", "sha256": "00" * 32}]}, "entry 1: user must be a non-empty string"),
        ({"tokens": [{"user": "a", "role": "user", "sha256": "00" * 32, "token": "x"}]}, "unknown key 'token'"),
        (
            {"tokens": [{"user": "a", "role": "user", "sha256": "00" * 32}, {"user": "b", "role": "user", "sha256": "00" * 32}]},
            "entry 2 (b): same sha256 as entry 1",
        ),
        ({"token": []}, "unknown key 'token'"),
        ({"tokens": "x"}, "array of tables"),
    ],
)
def test_a_bad_tokens_file_names_the_entry(document, message):
    with pytest.raises(TokensFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_tokens(document, "tokens file t.toml")


@pytest.mark.parametrize(
    "metadata, token, problem",
    [
        ([("authorization", "Bearer abc")], "abc", ""),
        ([("authorization", "bearer  abc ")], "abc", ""),
        ([], None, "no authorization metadata"),
        ([("authorization", "Basic abc")], None, "must be 'Bearer TOKEN'"),
        ([("authorization", "Bearer ")], None, "must be 'Bearer TOKEN'"),
        ([("authorization", "Bearer a"), ("authorization", "Bearer b")], None, "more than one"),
        ([("authorization", "Bearer " + "x" * 5000)], None, "longer than 4096"),
    ],
)
def test_bearer_token_is_read_from_metadata(metadata, token, problem):
    found, why = bearer_token(metadata)
    assert found == token
    assert problem in why


def test_users_read_and_submit_and_change_only_their_own_jobs():
    alice, ops = Caller("alice", "user"), Caller("ops", "admin")
    assert authorize(alice, Action.READ) is None
    assert authorize(alice, Action.SUBMIT) is None
    assert authorize(alice, Action.CHANGE_JOB, job_owner="alice") is None
    assert "belongs to bob" in authorize(alice, Action.CHANGE_JOB, job_owner="bob")
    assert "needs role admin" in authorize(alice, Action.OPERATE)
    for action in Action:
        assert authorize(ops, action, job_owner="bob") is None
        assert authorize(OPEN_ACCESS, action, job_owner="bob") is None


def test_stream_quota_counts_per_client():
    quota = StreamQuota(2)
    assert quota.try_open("user alice") is None
    assert quota.try_open("user alice") is None
    assert "max_streams_per_client=2" in quota.try_open("user alice")
    assert quota.try_open("user bob") is None
    quota.close("user alice")
    assert quota.try_open("user alice") is None
    assert StreamQuota(0).try_open("anyone") is None  # 0 = no limit


def test_a_node_may_register_only_as_the_node_its_certificate_names():
    assert node_identity_problem("n1", [], mutual_tls=False) is None
    assert node_identity_problem("n1", ["n1", "n1.example"], mutual_tls=True) is None
    assert "not the node named in the client certificate (n2)" in node_identity_problem("n1", ["n2"], mutual_tls=True)
    assert "no node certificate" in node_identity_problem("n1", [], mutual_tls=True, agent_listen="0.0.0.0:50052")
    assert "not in allowed_nodes" in node_identity_problem("n3", ["n3"], mutual_tls=True, allowed_nodes=["n1", "n2"])
    assert node_identity_problem("n1", ["n1"], mutual_tls=True, allowed_nodes=["n1"]) is None


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("localhost", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
        ("coord.example", False),
    ],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(listen="0.0.0.0:50051"), "not a loopback address and TLS is off"),
        (dict(tls_cert="c.pem"), "tls_cert and tls_key go together"),
        (dict(tls_client_ca="ca.pem"), "tls_client_ca needs tls_cert"),
        (dict(agent_listen="0.0.0.0:50052", tls_cert="c", tls_key="k"), "agent_listen is the mutual-TLS port"),
        (dict(max_pending_jobs_per_user=-1), "max_pending_jobs_per_user must be >= 0"),
    ],
)
def test_unsafe_or_incomplete_security_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        CoordinatorSettings(**settings).validate()


SECURED = dict(tls_cert="c", tls_key="k", tokens_file="tokens.toml", tls_client_ca="ca.pem")


@pytest.mark.parametrize(
    "left_out, message",
    [
        (("tls_cert", "tls_key", "tls_client_ca"), "TLS is off [(]tls_cert, tls_key[)] and agents are not authenticated"),
        (("tokens_file",), "clients are not authenticated [(]tokens_file[)]"),
        (("tls_client_ca",), "agents are not authenticated [(]tls_client_ca[)]"),
    ],
)
def test_serving_the_network_needs_tls_tokens_and_agent_certificates_or_insecure(left_out, message):
    lacking = {name: value for name, value in SECURED.items() if name not in left_out}
    with pytest.raises(ValueError, match=f"listen '0.0.0.0:50051' is not a loopback address and {message}.*--insecure"):
        CoordinatorSettings(listen="0.0.0.0:50051", **lacking).validate()
    CoordinatorSettings(listen="0.0.0.0:50051", insecure=True, **lacking).validate()
    CoordinatorSettings(listen="127.0.0.1:50051", **lacking).validate()


def test_the_agents_port_is_held_to_the_same_rule():
    """It is a port of the same server: a node's certificate there must not let anyone submit as any user."""
    no_tokens = {name: value for name, value in SECURED.items() if name != "tokens_file"}
    with pytest.raises(
        ValueError, match=r"agent_listen '0\.0\.0\.0:50052' is not a loopback address and clients are not authenticated"
    ):
        CoordinatorSettings(listen="127.0.0.1:50051", agent_listen="0.0.0.0:50052", **no_tokens).validate()
    CoordinatorSettings(listen="127.0.0.1:50051", agent_listen="127.0.0.1:50052", **no_tokens).validate()
    CoordinatorSettings(listen="0.0.0.0:50051", agent_listen="0.0.0.0:50052", **SECURED).validate()


def test_plaintext_on_the_network_needs_insecure_and_full_security_needs_nothing_more():
    CoordinatorSettings(listen="0.0.0.0:50051", insecure=True).validate()
    CoordinatorSettings(listen="0.0.0.0:50051", **SECURED).validate()
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        AgentSettings(tls_key="k").validate()


def test_gpuctl_token_prints_a_token_and_an_entry_that_admits_it():
    token, entry = new_token("alice", "admin")
    import tomllib

    table = parse_tokens(tomllib.loads(entry), "printed entry")
    assert authenticate(table, token) == Caller("alice", "admin")
    assert token not in entry  # the file holds the digest only
    assert new_token("alice", "admin")[0] != token


# --- a coordinator with tokens -------------------------------------------------------------------------


def client(cluster: LocalCluster, user: str | None, **options) -> gpuorch.Client:
    token = TOKENS[user][0] if user else ""
    return gpuorch.Client(cluster.address, timeout=5, token=token, **options)


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    write_tokens(root / "tokens.toml")
    cluster = LocalCluster(root, token=TOKENS["ops"][0])
    cluster.start_coordinator(
        "--tokens-file", str(root / "tokens.toml"), "--max-pending-jobs-per-user", "3", "--max-streams-per-client", "2"
    )
    yield cluster
    cluster.stop()


def raw_call(cluster: LocalCluster, method, metadata):
    """Calls `method` (a MethodDescriptor) with an empty request; returns the status code."""
    with grpc.insecure_channel(cluster.address) as channel:
        path = f"/{method.containing_service.full_name}/{method.name}"
        if method.server_streaming:
            call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)(
                b"", metadata=metadata, timeout=5
            )
            try:
                list(call)
            except grpc.RpcError as error:
                return error.code(), error.details()
            return grpc.StatusCode.OK, ""
        try:
            channel.unary_unary(path, request_serializer=None, response_deserializer=None)(b"", metadata=metadata, timeout=5)
        except grpc.RpcError as error:
            return error.code(), error.details()
        return grpc.StatusCode.OK, ""


PROTECTED_METHODS = [
    method
    for file in (cluster_pb2, job_pb2)
    for service in file.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]


@pytest.mark.parametrize("method", PROTECTED_METHODS, ids=lambda method: method.name)
@pytest.mark.parametrize(
    "metadata, problem",
    [
        ((), "no authorization metadata"),
        ((("authorization", "Bearer not-a-token"),), "bearer token is not valid"),
        ((("authorization", "ops-token-0123456789"),), "must be 'Bearer TOKEN'"),
    ],
    ids=["missing", "unknown", "no-scheme"],
)
def test_every_cluster_and_job_method_wants_a_valid_token(token_cluster, method, metadata, problem):
    code, details = raw_call(token_cluster, method, metadata)
    assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
    assert problem in details


def test_health_answers_without_a_token(token_cluster):
    with grpc.insecure_channel(token_cluster.address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_the_owner_of_a_job_is_whoever_submitted_it(token_cluster):
    with client(token_cluster, "alice") as alice:
        job_id = alice.submit_job(argv=["true"], gpus=1, owner="mallory")
        assert alice.get_job(job_id).spec.owner == "alice"
        alice.cancel_job(job_id)


def test_users_change_only_their_own_jobs_and_admins_any(token_cluster):
    with client(token_cluster, "alice") as alice, client(token_cluster, "bob") as bob, client(token_cluster, "ops") as ops:
        job_id = alice.submit_job(argv=["true"], gpus=1)
        assert bob.get_job(job_id).spec.owner == "alice"  # everyone may read
        with pytest.raises(PermissionDenied, match="bob may only change their own jobs; this job belongs to alice"):
            bob.cancel_job(job_id)
        with pytest.raises(PermissionDenied, match="belongs to alice"):
            bob.set_job_priority(job_id, 9)
        assert alice.set_job_priority(job_id, 5).spec.priority == 5
        assert ops.cancel_job(job_id).state == job_pb2.JOB_STATE_CANCELLED
        with pytest.raises(PermissionDenied, match="alice has role user; to operate nodes needs role admin"):
            alice.drain_node("gpu-node-7")
        with pytest.raises(NotFound):  # past the permission check: the node just does not exist
            ops.drain_node("gpu-node-7")


def test_pending_jobs_per_user_are_limited(token_cluster):
    with client(token_cluster, "bob") as bob, client(token_cluster, "ops") as ops:
        queued = [bob.submit_job(argv=["true"], gpus=1) for _ in range(3)]
        with pytest.raises(ResourceExhausted, match="bob already has 3 pending jobs; the limit is max_pending_jobs_per_user=3"):
            bob.submit_job(argv=["true"], gpus=1)
        ops.submit_job(argv=["true"], gpus=1)  # another user is not affected
        bob.cancel_job(queued[0])
        queued.append(bob.submit_job(argv=["true"], gpus=1))  # room again
        for job_id in queued[1:]:
            bob.cancel_job(job_id)


def test_open_streams_per_client_are_limited(token_cluster):
    with client(token_cluster, "alice") as alice:
        job_id = alice.submit_job(argv=["true"], gpus=1)  # stays pending: no nodes, so its watch stays open
        first, second = alice.watch_job(job_id), alice.watch_job(job_id)
        next(first), next(second)
        with pytest.raises(
            ResourceExhausted, match="user alice already has 2 open streams; the limit is max_streams_per_client=2"
        ):
            next(alice.watch_job(job_id))
        with client(token_cluster, "bob") as bob:
            next(bob.watch_job(job_id))  # counted per user
        first.close()
        wait_for(lambda: next(alice.watch_job(job_id)), timeout=5, what="a stream slot to be given back")
        second.close()
        alice.cancel_job(job_id)


def test_tokenless_health_watches_and_reflection_streams_count_per_host(token_cluster):
    """Health and reflection need no token, so they would otherwise let anyone hold streams open without end."""
    with grpc.insecure_channel(token_cluster.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        first, second = health.Watch(health_pb2.HealthCheckRequest()), health.Watch(health_pb2.HealthCheckRequest())
        assert next(first).status == next(second).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            next(health.Watch(health_pb2.HealthCheckRequest(), timeout=5))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "peer ipv4:127.0.0.1 already has 2 open streams; the limit is max_streams_per_client=2" in refused.value.details()
        reflection_stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="*")]), timeout=5
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(reflection_stream)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        first.cancel()
        wait_for(
            lambda: next(health.Watch(health_pb2.HealthCheckRequest(), timeout=5)), timeout=5, what="a slot to be given back"
        )
        second.cancel()
        listing = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="*")]), timeout=5
        )
        assert "grpc.health.v1.Health" in {service.name for service in next(listing).list_services_response.service}


def test_gpuctl_uses_the_token_from_the_environment(token_cluster):
    def gpuctl(*args, token=""):
        environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "GPUORCH_COORDINATOR": token_cluster.address}
        if token:
            environment["GPUORCH_TOKEN"] = token
        return subprocess.run(
            [sys.executable, "-m", "gpuorch.cli", *args], capture_output=True, text=True, env=environment, timeout=30
        )

    denied = gpuctl("jobs")
    assert denied.returncode == 1
    assert "no authorization metadata" in denied.stderr
    allowed = gpuctl("-o", "json", "submit", "--owner", "someone-else", "--", "true", token=TOKENS["bob"][0])
    assert allowed.returncode == 0, allowed.stderr
    job_id = json.loads(allowed.stdout)["job_id"]
    shown = json.loads(gpuctl("-o", "json", "job", job_id, token=TOKENS["bob"][0]).stdout)
    assert shown["spec"]["owner"] == "bob"
    assert gpuctl("cancel", job_id, token=TOKENS["alice"][0]).returncode == 1
    assert gpuctl("cancel", job_id, token=TOKENS["bob"][0]).returncode == 0


def test_tokens_never_reach_the_log(token_cluster):
    with client(token_cluster, "alice") as alice:
        alice.list_jobs()
    with pytest.raises(Unauthenticated):
        gpuorch.Client(token_cluster.address, timeout=5, token="secret-guess-42").list_jobs()
    log = token_cluster.coordinator.output()
    assert "alice-token" not in log and "secret-guess-42" not in log and "ops-token" not in log


def test_tokens_are_added_and_revoked_without_a_restart(tmp_path):
    write_tokens(tmp_path / "tokens.toml")
    cluster = LocalCluster(tmp_path, token=TOKENS["ops"][0])
    cluster.start_coordinator("--tokens-file", str(tmp_path / "tokens.toml"))
    try:
        carol = gpuorch.Client(cluster.address, timeout=5, token="carol-token-1")
        with pytest.raises(Unauthenticated):
            carol.list_jobs()
        with open(tmp_path / "tokens.toml", "a") as handle:
            handle.write(tokens_entry("carol", "carol-token-1", "user"))
        wait_for(lambda: carol.list_jobs() is not None, timeout=10, interval=0.2, what="carol's new token to be accepted")
        # A broken edit keeps the tokens that were loaded, and says so in the log.
        (tmp_path / "tokens.toml").write_text((tmp_path / "tokens.toml").read_text() + "[[tokens]]\nrole = 'god'\n")
        wait_for(
            lambda: carol.list_jobs() is not None and "tokens file changed but is invalid" in cluster.coordinator.output(),
            timeout=10,
            interval=0.2,
            what="the bad edit to be logged (the file is looked at when calls come in)",
        )
        write_tokens(tmp_path / "tokens.toml")  # carol revoked
        wait_for(lambda: _unauthenticated(carol.list_jobs), timeout=10, interval=0.2, what="carol's token to be revoked")
        carol.close()
    finally:
        cluster.stop()


def _unauthenticated(call) -> bool:
    try:
        call()
    except Unauthenticated:
        return True
    return False


def test_a_bad_tokens_file_stops_the_start_naming_the_entry(tmp_path):
    (tmp_path / "tokens.toml").write_text('[[tokens]]\nuser = "alice"\nrole = "superuser"\nsha256 = "00"\n')
    cluster = LocalCluster(tmp_path)
    coordinator = cluster.start_coordinator("--tokens-file", str(tmp_path / "tokens.toml"), wait=False)
    assert coordinator.process.wait(20) == 2
    assert "entry 1 (alice): role must be 'admin' or 'user'" in coordinator.output()


# --- plaintext only on loopback ------------------------------------------------------------------------


def test_without_tls_the_coordinator_refuses_a_network_address(tmp_path):
    cluster = LocalCluster(tmp_path)
    cluster.address = f"0.0.0.0:{cluster.port}"
    coordinator = cluster.start_coordinator(wait=False)
    assert coordinator.process.wait(20) == 2
    assert "is not a loopback address and TLS is off" in coordinator.output()
    assert "--insecure" in coordinator.output()


def test_insecure_allows_plaintext_on_the_network_and_says_so(tmp_path):
    port = free_port()
    cluster = LocalCluster(tmp_path)
    cluster.address = f"0.0.0.0:{port}"
    cluster.start_coordinator("--insecure", wait=False)
    try:
        with gpuorch.Client(f"127.0.0.1:{port}", timeout=5) as reaching:
            wait_for(reaching.cluster_status, timeout=15, what="coordinator to serve")
        assert "TLS is off and insecure is set" in cluster.coordinator.output()
        # 0.0.0.0 is no loopback address (though Linux delivers it to this machine): clients speak
        # TLS to it, so a token is never sent in the clear, unless told the coordinator is insecure.
        with pytest.raises(Unavailable):
            gpuorch.Client(f"0.0.0.0:{port}", timeout=3, token="never-in-plaintext").cluster_status()
        with gpuorch.Client(f"0.0.0.0:{port}", timeout=5, insecure=True) as told:
            assert told.cluster_status().coordinator_epoch >= 1
        environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
        gpuctl = [sys.executable, "-m", "gpuorch.cli", "--coordinator", f"0.0.0.0:{port}", "--timeout", "3", "status"]
        refused = subprocess.run(gpuctl, capture_output=True, text=True, env=environment, timeout=30)
        assert refused.returncode != 0
        served = subprocess.run(
            [*gpuctl[:-1], "--insecure", "status"], capture_output=True, text=True, env=environment, timeout=30
        )
        assert served.returncode == 0, served.stderr
        served = subprocess.run(
            gpuctl, capture_output=True, text=True, env={**environment, "GPUORCH_CLIENT_INSECURE": "yes"}, timeout=30
        )
        assert served.returncode == 0, served.stderr
        for value in ("no", "False", "0", "off"):  # a "no" of any spelling never means plaintext
            refused = subprocess.run(
                gpuctl, capture_output=True, text=True, env={**environment, "GPUORCH_CLIENT_INSECURE": value}, timeout=30
            )
            assert refused.returncode != 0 and "--insecure" in refused.stderr, (value, refused.stderr)
        typo = subprocess.run(
            gpuctl, capture_output=True, text=True, env={**environment, "GPUORCH_CLIENT_INSECURE": "nope"}, timeout=30
        )
        assert typo.returncode == 2 and "$GPUORCH_CLIENT_INSECURE: expected true or false, got 'nope'" in typo.stderr, typo.stderr
    finally:
        cluster.stop()


@pytest.mark.parametrize(
    "address, local",
    [("127.0.0.1:50051", True), ("localhost:50051", True), ("[::1]:50051", True), ("unix:/run/gpuorch.sock", True),
     ("ipv4:127.0.0.1:1", True), ("0.0.0.0:50051", False), ("10.0.0.5:50051", False), ("coord.example:50051", False),
     ("dns:///coord.example:50051", False)],
)  # fmt: skip
def test_clients_send_plaintext_only_to_this_machine(address, local):
    assert is_local_address(address) is local


def test_on_loopback_without_tls_the_log_says_so(token_cluster):
    output = token_cluster.coordinator.output()
    assert "TLS is off: serving on loopback only" in output
    assert "tls_client_ca is not set: agents are not authenticated" in output


# --- TLS and mutual TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["bash", str(REPO / "scripts" / "make-certs.sh"), str(directory), "localhost,127.0.0.1", "node-1", "node-2"],
        check=True,
        capture_output=True,
    )
    return directory


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, certificates):
    root = tmp_path_factory.mktemp("mtls")
    write_tokens(root / "tokens.toml")
    cluster = LocalCluster(root, token=TOKENS["ops"][0], tls_ca=str(certificates / "ca.crt"))
    cluster.agent_port = free_port()
    cluster.start_coordinator(
        "--tls-cert", str(certificates / "coordinator.crt"),
        "--tls-key", str(certificates / "coordinator.key"),
        "--tls-client-ca", str(certificates / "ca.crt"),
        "--agent-listen", f"127.0.0.1:{cluster.agent_port}",
        "--tokens-file", str(root / "tokens.toml"),
    )  # fmt: skip
    yield cluster
    cluster.stop()


def start_agent(cluster: LocalCluster, node_id: str, *tls_flags: str, port: int | None = None):
    return cluster.add_agent(node_id, 1, *tls_flags, coordinator=f"127.0.0.1:{port or cluster.agent_port}")


def test_tls_serves_clients_that_trust_the_ca(tls_cluster, certificates):
    assert tls_cluster.client().cluster_status().coordinator_epoch >= 1
    with pytest.raises(Unavailable):  # plaintext against a TLS port: no handshake
        gpuorch.Client(tls_cluster.address, timeout=3, token=TOKENS["ops"][0], tls_ca="").cluster_status()
    with pytest.raises(Unauthenticated):  # TLS does not replace the token
        gpuorch.Client(tls_cluster.address, timeout=5, token="", tls_ca=str(certificates / "ca.crt")).list_jobs()


def test_gpuctl_over_tls(tls_cluster, certificates):
    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "GPUORCH_TOKEN": TOKENS["alice"][0]}
    base = [sys.executable, "-m", "gpuorch.cli", "--coordinator", tls_cluster.address, "-o", "json"]
    trusted = subprocess.run(
        [*base, "--tls-ca", str(certificates / "ca.crt"), "status"], capture_output=True, text=True, env=environment, timeout=30
    )
    assert trusted.returncode == 0, trusted.stderr
    assert int(json.loads(trusted.stdout)["coordinator_epoch"]) >= 1
    missing = subprocess.run(
        [*base, "--tls-ca", str(certificates / "nope.crt"), "status"], capture_output=True, text=True, env=environment, timeout=30
    )
    assert missing.returncode == 2
    assert "tls_ca" in missing.stderr and "nope.crt" in missing.stderr


def test_a_node_registers_with_its_own_certificate(tls_cluster, certificates):
    start_agent(
        tls_cluster,
        "node-1",
        "--tls-ca",
        str(certificates / "ca.crt"),
        "--tls-cert",
        str(certificates / "nodes" / "node-1.crt"),
        "--tls-key",
        str(certificates / "nodes" / "node-1.key"),
    )
    tls_cluster.wait_for_nodes(1)
    assert [node.node_id for node in tls_cluster.client().list_nodes()] == ["node-1"]


def test_a_node_cannot_register_as_another(tls_cluster, certificates):
    impostor = start_agent(
        tls_cluster,
        "node-9",
        "--tls-ca",
        str(certificates / "ca.crt"),
        "--tls-cert",
        str(certificates / "nodes" / "node-2.crt"),
        "--tls-key",
        str(certificates / "nodes" / "node-2.key"),
    )
    wait_for(lambda: "registration refused" in tls_cluster.coordinator.output(), timeout=10, what="the refusal to be logged")
    assert "node id 'node-9' is not the node named in the client certificate (node-2)" in tls_cluster.coordinator.output()
    wait_for(lambda: "PERMISSION_DENIED" in impostor.output(), timeout=10, what="the agent to log the refusal")
    with pytest.raises(NotFound):
        tls_cluster.client().get_node("node-9")
    impostor.stop()


def issue_certificate(certificates: Path, into: Path, name: str, subject: str, extensions: Path) -> tuple[Path, Path]:
    """A key and a certificate for `subject`, signed by the test CA with the given extensions file."""
    key, request, certificate = (into / f"{name}.{suffix}" for suffix in ("key", "csr", "crt"))
    ca = ["-CA", str(certificates / "ca.crt"), "-CAkey", str(certificates / "ca.key"), "-CAcreateserial"]
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    subprocess.run(
        ["openssl", "req", *new_key, "-subj", subject, "-keyout", str(key), "-out", str(request)], check=True, capture_output=True
    )
    sign = ["-in", str(request), *ca, "-days", "1", "-extfile", str(extensions), "-out", str(certificate)]
    subprocess.run(["openssl", "x509", "-req", *sign], check=True, capture_output=True)
    return key, certificate


def test_only_a_certificates_node_uri_names_a_node(tls_cluster, certificates, tmp_path):
    """Its common name, DNS, email, other URI and IP entries do not: a person's certificate made out to "CN=alice"
    must not make its holder node "alice", nor may one certificate speak for several nodes through other entries."""
    extensions = tmp_path / "extensions"
    extensions.write_text(
        "subjectAltName=URI:spiffe://gpuorch/node/node-5,DNS:node-8,email:node-6,URI:node-7,IP:10.9.9.9\nextendedKeyUsage=clientAuth\n"
    )
    key, certificate = issue_certificate(certificates, tmp_path, "mixed", "/CN=node-8", extensions)
    by_common_name = start_agent(
        tls_cluster, "node-8", "--tls-ca", str(certificates / "ca.crt"), "--tls-cert", str(certificate), "--tls-key", str(key)
    )
    wait_for(lambda: "node id 'node-8' is not the node named" in tls_cluster.coordinator.output(), timeout=10, what="the refusal")
    assert "in the client certificate (node-5);" in tls_cluster.coordinator.output(), (
        "the DNS, email, URI and IP entries are no node ids"
    )
    by_common_name.stop()
    with pytest.raises(NotFound):
        tls_cluster.client().get_node("node-8")


def test_a_persons_certificate_from_the_same_ca_is_refused_as_a_node(tls_cluster, certificates, tmp_path):
    """A certificate a person got from the cluster's CA, naming their laptop as a DNS name, registered as that
    node and was sent other users' jobs; only a node certificate (URI SAN spiffe://gpuorch/node/<id>) names a node."""
    subprocess.run(["bash", str(REPO / "scripts" / "make-certs.sh"), str(certificates), "localhost,127.0.0.1", "user:alice"],
                   check=True, capture_output=True)  # fmt: skip
    person = subprocess.run(
        ["openssl", "x509", "-in", str(certificates / "users" / "alice.crt"), "-noout", "-ext", "subjectAltName"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "spiffe://gpuorch/node/" not in person, "make-certs.sh issues people's certificates without a node URI"
    extensions = tmp_path / "extensions"
    extensions.write_text("subjectAltName=DNS:alice-laptop.corp\nextendedKeyUsage=clientAuth\n")
    key, certificate = issue_certificate(certificates, tmp_path, "laptop", "/CN=alice", extensions)
    laptop = start_agent(
        tls_cluster,
        "alice-laptop.corp",
        "--tls-ca",
        str(certificates / "ca.crt"),
        "--tls-cert",
        str(certificate),
        "--tls-key",
        str(key),
    )
    refusal = "node 'alice-laptop.corp' presented no node certificate"
    wait_for(lambda: refusal in tls_cluster.coordinator.output(), timeout=10, what="the refusal")
    wait_for(lambda: "PERMISSION_DENIED" in laptop.output(), timeout=10, what="the agent to log the refusal")
    with pytest.raises(NotFound):
        tls_cluster.client().get_node("alice-laptop.corp")
    laptop.stop()


def test_connections_that_never_finish_the_tls_handshake_are_closed(tls_cluster):
    """grpc keeps them 120 s by default: a few hundred such connections used up the coordinator's fds."""
    import socket
    import time

    started = time.monotonic()
    idle = [socket.create_connection(("127.0.0.1", tls_cluster.port), timeout=15) for _ in range(5)]
    try:
        for connection in idle:
            assert connection.recv(1) == b"", "the coordinator closes the connection without a word"
    finally:
        for connection in idle:
            connection.close()
    closed_after = time.monotonic() - started
    assert closed_after < CoordinatorSettings.handshake_timeout + 3, f"closed after {closed_after:.1f}s"
    assert tls_cluster.client().cluster_status().coordinator_epoch >= 1


def test_an_agent_without_a_certificate_is_refused(tls_cluster, certificates):
    # On the clients' port TLS works without a client certificate, but registering needs one.
    anonymous = start_agent(tls_cluster, "node-2", "--tls-ca", str(certificates / "ca.crt"), port=tls_cluster.port)
    wait_for(lambda: "presented no node certificate" in tls_cluster.coordinator.output(), timeout=10, what="the refusal")
    with pytest.raises(NotFound):
        tls_cluster.client().get_node("node-2")
    anonymous.stop()


@pytest.mark.skipif(grpcurl_binary() is None, reason="grpcurl not installed")
def test_grpcurl_checks_health_over_tls(tls_cluster, certificates):
    grpcurl = grpcurl_binary()
    answer = subprocess.run(
        [grpcurl, "-cacert", str(certificates / "ca.crt"), tls_cluster.address, "grpc.health.v1.Health/Check"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    assert '"status": "SERVING"' in answer.stdout


def test_a_missing_certificate_file_stops_the_start(tmp_path):
    cluster = LocalCluster(tmp_path)
    coordinator = cluster.start_coordinator(
        "--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", str(tmp_path / "nope.key"), wait=False
    )
    assert coordinator.process.wait(20) == 2
    assert f"tls_cert {tmp_path / 'nope.crt'}: No such file or directory" in coordinator.output()


def test_invalid_argument_still_names_the_problem_with_tokens_on(token_cluster):
    with client(token_cluster, "alice") as alice, pytest.raises(InvalidArgument, match=r"spec\.argv is empty"):
        alice.submit_job(argv=[], gpus=1)
