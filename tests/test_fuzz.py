"""Property-based fuzzing (hypothesis) of every RPC of a running coordinator.

A real coordinator process on loopback, with tokens on, holds a job and a node (of a
real agent) before the fuzzing starts. Every method of every service it serves gets
(a) random and corrupted bytes, (b) well-formed messages built from the message
descriptors with hostile values (huge strings, extreme and negative numbers, NaN,
unknown enum values, every nesting), and (c) random metadata (authorization missing,
wrong, malformed, a user's or an admin's token, garbage headers). For every call:

- the status is never UNKNOWN or INTERNAL (an exception escaped a handler), nor
  DEADLINE_EXCEEDED (a handler hung);
- every non-OK status says what was wrong (non-empty details); bytes that are not a
  valid request get INVALID_ARGUMENT naming the message type; a protected method
  called without a valid token gets UNAUTHENTICATED naming the problem (a protected request stream, such as
  Attach, checks the token before it reads a message, so even before a too-large or malformed first message);
- the coordinator process is alive.

Afterwards (the last test) Health answers SERVING, the job and node are unchanged, the
agent still streams, and the log holds no traceback.

Reproducible by default (derandomized). GPUORCH_FUZZ_EXAMPLES=N sets the examples per
method and kind (default 30); GPUORCH_FUZZ_RANDOM=1 draws new examples on every run.
A JSON summary of requests and outcomes is printed, and written to the file named by
GPUORCH_FUZZ_SUMMARY.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import time
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import descriptor, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpuorch
from gpuorch.v1 import agent_pb2, cluster_pb2, interactive_pb2, job_pb2
from tests.harness import SUMMARY_LINES, LocalCluster, wait_for

ADMIN_TOKEN = "fuzz-admin-token-5f1c0e"
USER_TOKEN = "fuzz-user-token-9a7b22"
TOKENS = {"ops": (ADMIN_TOKEN, "admin"), "alice": (USER_TOKEN, "user")}
VALID_AUTHORIZATION = {f"Bearer {ADMIN_TOKEN}", f"Bearer {USER_TOKEN}"}

SERVICES = (
    agent_pb2.DESCRIPTOR.services_by_name["AgentService"],
    cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"],
    job_pb2.DESCRIPTOR.services_by_name["JobService"],
    interactive_pb2.DESCRIPTOR.services_by_name["InteractiveService"],
    interactive_pb2.DESCRIPTOR.services_by_name["SessionRelayService"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
)
METHODS = [method for service in SERVICES for method in service.methods]
PROTECTED_SERVICES = {"gpuorch.v1.ClusterService", "gpuorch.v1.JobService", "gpuorch.v1.InteractiveService"}
"""Services that want a bearer token (agents prove who they are with certificates, and a session's relay with its
secret; health and reflection are open)."""
MUTATING_METHODS = {"CancelJob", "SetJobPriority", "DrainNode", "ResumeNode"}
SESSIONS_THAT_ACT = {"Exec", "PortForward"}
"""Sessions that would run a fuzzed command, or connect to a fuzzed port on this machine's loopback, on a running job:
they are given only the pending jobs. Attach only writes to the kept interactive job's terminal, which discards it."""

EXAMPLES = int(os.environ.get("GPUORCH_FUZZ_EXAMPLES", "30"))
DEADLINE_SECONDS = 5.0
"""Every call's deadline: a handler that answers nothing within it has hung."""
OPEN_STREAM_WINDOW_SECONDS = 0.05
"""After its first message, how long a response stream that stays open (a watch) is read before the fuzzer cancels it."""
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""The coordinator's default max_message_bytes."""
METADATA_SOFT_LIMIT_BYTES = 8 * 1024
"""grpc's default soft limit on a call's metadata: above it, the transport may refuse the call (RESOURCE_EXHAUSTED)."""
NODE_ID = "kept-node"
KEPT_TERMINAL = (
    "import os, signal\n"
    "for number in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGHUP):\n"
    "    signal.signal(number, signal.SIG_IGN)\n"
    "while True:\n"
    "    os.read(0, 65536)\n"
)
"""Rank 0 of the kept interactive job: reads and drops whatever fuzzed Attach calls type, Ctrl-C, Ctrl-Z and Ctrl-D too."""
KEPT_MODEL = "kept-model-that-no-fuzzed-device-has"
"""A requirement no GPU meets, so the jobs kept across the fuzzing stay PENDING whatever nodes it registers."""


# -- strategies ---------------------------------------------------------------------------------


def printable(max_size: int) -> st.SearchStrategy[str]:
    """What a text metadata value may hold on the wire (grpc refuses other characters client-side)."""
    return st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=max_size)


HUGE_TEXT = st.builds(
    lambda character, length: character * length,
    st.sampled_from("x\u00e9\u4e2d\U0001f600"),
    # around the limits: bearer token 4096, argv 64 KiB, env 128 KiB, message 4 MiB
    st.sampled_from([4_097, 70_000, 140_000, 1_500_000, 4_300_000]),
)
HUGE_BYTES = st.sampled_from([70_000, 1_500_000, 4_300_000]).map(lambda length: b"\xff" * length)

SYMBOLS = [
    *(service.full_name for service in SERVICES),
    *(f"{method.containing_service.full_name}.{method.name}" for method in METHODS),
    "gpuorch.v1.JobSpec",
    "gpuorch.v1.Device",
    "gpuorch.v1.NodeState",
    "gpuorch.v1.SessionInput",
    "google.protobuf.Timestamp",
    "grpc.health.v1.HealthCheckRequest",
]
FILES = [
    "gpuorch/v1/agent.proto",
    "gpuorch/v1/cluster.proto",
    "gpuorch/v1/job.proto",
    "gpuorch/v1/interactive.proto",
    "google/protobuf/timestamp.proto",
    "grpc_health/v1/health.proto",
    "grpc_reflection/v1alpha/reflection.proto",
]


@dataclass(frozen=True)
class KeptData:
    """What the fuzzing must leave as it was."""

    job_id: str
    """Owned by the admin; read by the fuzzing, never targeted by a method that changes jobs."""
    spare_job_id: str
    """Owned by the user; the methods that change jobs may target it."""
    interactive_job_id: str
    """Owned by the admin, RUNNING on the kept node with a terminal that discards what it gets: Attach's target."""
    node_id: str


def _hints(field_name: str, kept: KeptData, method_name: str) -> st.SearchStrategy[str] | None:
    """Plausible values of a string field, so the fuzzing gets past the first checks into the logic behind them."""
    changes_things = method_name in MUTATING_METHODS or method_name == "Connect"
    if field_name == "job_id":
        # Shaped like real ids (j-<sequence>-<6 random base32 characters>), so they pass the id's own checks.
        suffixes = st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", min_size=6, max_size=6)
        numbered = st.builds("j-{:06d}-{}".format, st.integers(1, 400), suffixes)
        known = [kept.spare_job_id] if changes_things else [kept.job_id, kept.spare_job_id]
        if not changes_things and method_name not in SESSIONS_THAT_ACT:
            known.append(kept.interactive_job_id)
        return st.one_of(numbered, st.sampled_from(known))
    if field_name == "node_id":
        made_up = st.from_regex(r"[a-z][a-z0-9._:-]{0,24}", fullmatch=True)
        return made_up if changes_things else st.one_of(made_up, st.just(kept.node_id))
    hints = {
        "uuid": st.integers(0, 4).map("GPU-fuzz-{}".format),
        "service": st.sampled_from(["", *(service.full_name for service in SERVICES)]),
        "file_by_filename": st.sampled_from(FILES),
        "file_containing_symbol": st.sampled_from(SYMBOLS),
        "all_extension_numbers_of_type": st.sampled_from(SYMBOLS),
        "containing_type": st.sampled_from(SYMBOLS),
        "list_services": st.just("*"),
        "backend": st.sampled_from(["nccl", "gloo"]),
        "argv": st.sampled_from(["true", "python3", "-c", "/bin/sh"]),
        "owner": st.sampled_from(["alice", "ops", "root", "nobody"]),
        "working_dir": st.sampled_from(["/tmp", "/", "relative/dir"]),
        "page_token": st.integers(-5, 10**6).map(str),
        "key": st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True),
    }
    return hints.get(field_name)


def text_for(field_name: str, kept: KeptData, method_name: str) -> st.SearchStrategy[str]:
    options = [st.text(max_size=40), HUGE_TEXT]
    hinted = _hints(field_name, kept, method_name)
    if hinted is not None:
        options.append(hinted)
    untouchable = {KEPT_MODEL} | ({kept.job_id, kept.node_id} if method_name in MUTATING_METHODS | {"Connect"} else set())
    if method_name in MUTATING_METHODS | SESSIONS_THAT_ACT | {"Connect"}:
        untouchable.add(kept.interactive_job_id)
    return st.one_of(*options).filter(lambda text: text not in untouchable)


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = sorted({low, high, 0, 1, max(low, -1)})
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


_FIELD = descriptor.FieldDescriptor
_INTEGER_RANGES = {
    _FIELD.TYPE_INT32: (-(2**31), 2**31 - 1),
    _FIELD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _FIELD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _FIELD.TYPE_INT64: (-(2**63), 2**63 - 1),
    _FIELD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _FIELD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _FIELD.TYPE_UINT32: (0, 2**32 - 1),
    _FIELD.TYPE_FIXED32: (0, 2**32 - 1),
    _FIELD.TYPE_UINT64: (0, 2**64 - 1),
    _FIELD.TYPE_FIXED64: (0, 2**64 - 1),
}
MAX_DEPTH = 8


def _single_value(field: descriptor.FieldDescriptor, kept: KeptData, method_name: str, depth: int) -> st.SearchStrategy:
    if field.type == _FIELD.TYPE_MESSAGE:
        return messages(field.message_type, kept, method_name, depth + 1)
    if field.type == _FIELD.TYPE_ENUM:
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _integers(-(2**31), 2**31 - 1))  # proto3 enums are open
    if field.type == _FIELD.TYPE_STRING:
        return text_for(field.name, kept, method_name)
    if field.type == _FIELD.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), HUGE_BYTES)
    if field.type == _FIELD.TYPE_BOOL:
        return st.booleans()
    if field.type == _FIELD.TYPE_DOUBLE:
        return st.floats()
    if field.type == _FIELD.TYPE_FLOAT:
        return st.floats(width=32)
    return _integers(*_INTEGER_RANGES[field.type])


def _field_values(field: descriptor.FieldDescriptor, kept: KeptData, method_name: str, depth: int) -> st.SearchStrategy:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        keys = _single_value(entry.fields_by_name["key"], kept, method_name, depth)
        return st.dictionaries(keys, _single_value(entry.fields_by_name["value"], kept, method_name, depth), max_size=3)
    if field.is_repeated:
        return st.lists(_single_value(field, kept, method_name, depth), max_size=3)
    return _single_value(field, kept, method_name, depth)


def _assign(instance, field: descriptor.FieldDescriptor, value) -> None:
    target_name = field.name
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        target = getattr(instance, target_name)
        for key, item in value.items():
            if entry.fields_by_name["value"].message_type is not None:
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif field.is_repeated:
        getattr(instance, target_name).extend(value)
    elif entry is not None:
        getattr(instance, target_name).CopyFrom(value)
    else:
        setattr(instance, target_name, value)


def messages(message_type: descriptor.Descriptor, kept: KeptData, method_name: str, depth: int = 0) -> st.SearchStrategy:
    """Well-formed instances of `message_type` with any subset of its fields set to hostile values."""
    message_class = message_factory.GetMessageClass(message_type)
    if depth > MAX_DEPTH:
        return st.builds(message_class)
    plain = {
        field.name: st.deferred(lambda field=field: _field_values(field, kept, method_name, depth))
        for field in message_type.fields
        if field.containing_oneof is None
    }
    oneofs = {
        oneof.name: st.one_of(
            *(
                st.tuples(st.just(field), st.deferred(lambda field=field: _single_value(field, kept, method_name, depth)))
                for field in oneof.fields
            )
        )
        for oneof in message_type.oneofs
    }

    def build(values: dict):
        instance = message_class()
        for name, entry in values.items():
            field, value = entry if name in oneofs else (message_type.fields_by_name[name], entry)
            _assign(instance, field, value)
        return instance

    return st.fixed_dictionaries({}, optional={**plain, **oneofs}).map(build)


def corrupted(encoded: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Valid encodings damaged the way a broken or hostile peer damages them."""

    def damage(data: bytes, how: str, position: int, junk: bytes) -> bytes:
        at = position % (len(data) + 1)
        if how == "truncate":
            return data[:at]
        if how == "flip" and data:
            at = min(at, len(data) - 1)
            return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
        if how == "insert":
            return data[:at] + junk + data[at:]
        return data + junk

    return st.builds(
        damage,
        encoded,
        st.sampled_from(["truncate", "flip", "insert", "append"]),
        st.integers(0, 10**6),
        st.binary(min_size=1, max_size=8),
    )


def nested_groups(depth: int) -> bytes:
    """Unknown field 15 as groups nested `depth` deep: a parser that recurses without a limit overflows its stack."""
    return b"\x7b" * depth + b"\x7c" * depth


def garbage_bytes(message_type: descriptor.Descriptor, kept: KeptData, method_name: str) -> st.SearchStrategy[bytes]:
    encoded = messages(message_type, kept, method_name).map(lambda instance: instance.SerializeToString())
    return st.one_of(
        st.binary(max_size=256),
        corrupted(encoded),
        st.sampled_from([50, 200, 5_000, 100_000]).map(nested_groups),
        # one byte over the limit (built when drawn: a 4 MiB constant would be repr'd)
        st.builds(bytes, st.just(MAX_MESSAGE_BYTES + 1)),
    )


def _metadata_key() -> st.SearchStrategy[str]:
    return st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,24}", fullmatch=True).filter(
        lambda key: not key.startswith("grpc-") and not key.endswith("-bin") and key != "authorization"
    )


GARBAGE_HEADERS = st.lists(
    st.one_of(
        st.tuples(_metadata_key(), printable(200)),
        st.tuples(_metadata_key().map(lambda key: key + "-bin"), st.binary(max_size=200)),
        st.tuples(_metadata_key(), st.just("v" * 20_000)),  # over grpc's hard limit on metadata
    ),
    max_size=3,
)
AUTHORIZATION = st.one_of(
    st.just(()),
    st.sampled_from(sorted(VALID_AUTHORIZATION)).map(lambda value: (("authorization", value),)),
    printable(60).map(lambda token: (("authorization", f"Bearer {token}"),)),
    st.sampled_from(
        ["Bearer", "Bearer ", "bearer", "Basic b3BzOnB3", ADMIN_TOKEN, f"Token {ADMIN_TOKEN}", f"Bearer {ADMIN_TOKEN} extra"]
    ).map(lambda value: (("authorization", value),)),
    printable(200).map(lambda value: (("authorization", value),)),
    st.just((("authorization", f"Bearer {ADMIN_TOKEN}"), ("authorization", f"Bearer {USER_TOKEN}"))),
    st.just((("authorization", "Bearer " + "t" * 5_000),)),
)
METADATA = st.builds(lambda authorization, headers: (*authorization, *headers), AUTHORIZATION, GARBAGE_HEADERS)
VALID_TOKENS = st.sampled_from(sorted(VALID_AUTHORIZATION)).map(lambda value: (("authorization", value),))


# -- calling the coordinator ----------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode | None
    """None: a response stream still open when the fuzzer stopped reading and cancelled it."""
    details: str
    responses: int


class Fuzzer:
    """Makes raw calls (bytes in, bytes out) to a coordinator, and counts what came back.

    Request streams go through grpc's synchronous API: when the server has ended a call
    (say, INVALID_ARGUMENT on its first message) while the client still writes, grpc.aio's
    client replaces the server's status with its own INTERNAL "Internal error from Core",
    and the synchronous client does not. Everything else goes through grpc.aio, on an
    event loop of the fuzzer's own, which can stop reading a watch after a while.
    """

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self.sync_channel = grpc.insecure_channel(cluster.address, options=options)
        self.loop = asyncio.new_event_loop()
        self.channel = self.loop.run_until_complete(self._open(options))
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.started = time.monotonic()

    async def _open(self, options) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.cluster.address, options=options)

    def close(self) -> None:
        self.loop.run_until_complete(self.channel.close())
        self.loop.close()
        self.sync_channel.close()

    def call(self, method: descriptor.MethodDescriptor, frames: list[bytes], metadata: tuple) -> Outcome:
        if method.client_streaming:
            outcome = self._call_with_request_stream(method, frames, metadata)
        else:
            outcome = self.loop.run_until_complete(self._call(method, frames[0], metadata))
        self.outcomes["STREAM_LEFT_OPEN" if outcome.code is None else outcome.code.name] += 1
        return outcome

    def _call_with_request_stream(self, method: descriptor.MethodDescriptor, frames: list[bytes], metadata: tuple) -> Outcome:
        """Sends every frame, half-closes, and reads until the server ends the call (it must, before the deadline)."""
        path = f"/{method.containing_service.full_name}/{method.name}"
        call = self.sync_channel.stream_stream(path, request_serializer=None, response_deserializer=None)(
            iter(frames), metadata=metadata, timeout=DEADLINE_SECONDS
        )
        responses = 0
        try:
            for _ in call:
                responses += 1
        except grpc.RpcError as error:
            return Outcome(error.code(), error.details() or "", responses)
        return Outcome(call.code(), call.details() or "", responses)

    async def _call(self, method: descriptor.MethodDescriptor, request: bytes, metadata: tuple) -> Outcome:
        path = f"/{method.containing_service.full_name}/{method.name}"
        raw = dict(request_serializer=None, response_deserializer=None)
        if method.server_streaming:
            call = self.channel.unary_stream(path, **raw)(request, metadata=metadata, timeout=DEADLINE_SECONDS)
            return await self._read_stream(call)
        try:
            await self.channel.unary_unary(path, **raw)(request, metadata=metadata, timeout=DEADLINE_SECONDS)
        except grpc.aio.AioRpcError as error:
            return Outcome(error.code(), error.details() or "", 0)
        return Outcome(grpc.StatusCode.OK, "", 1)

    async def _read_stream(self, call) -> Outcome:
        """Reads a response stream that may stay open (a watch): it must send something before the
        deadline, and is then read only while more comes at once; still open, it is cancelled."""
        responses = 0
        try:
            while True:
                if responses:
                    try:
                        response = await asyncio.wait_for(call.read(), OPEN_STREAM_WINDOW_SECONDS)
                    except TimeoutError:
                        call.cancel()
                        return Outcome(None, "", responses)
                else:
                    response = await call.read()
                if response is grpc.aio.EOF:
                    break
                responses += 1
        except grpc.aio.AioRpcError as error:
            return Outcome(error.code(), error.details() or "", responses)
        return Outcome(await call.code(), await call.details() or "", responses)

    def summary(self) -> dict:
        outcomes = dict(sorted(self.outcomes.items(), key=lambda item: -item[1]))
        return {
            "requests": sum(self.outcomes.values()),
            "outcomes": outcomes,
            "methods": len(METHODS),
            "examples_per_method_and_kind": EXAMPLES,
            "seconds": round(time.monotonic() - self.started, 1),
        }


def _metadata_bytes(metadata: tuple) -> int:
    return sum(len(key) + len(value) for key, value in metadata)


def check(fuzz: Fuzzer, method: descriptor.MethodDescriptor, frames: list[bytes], metadata: tuple, outcome: Outcome) -> None:
    """The properties every call must have, whatever was sent."""
    name = f"{method.containing_service.full_name}/{method.name}"
    said = f"{name} answered {outcome.code.name if outcome.code else 'an open stream'} {outcome.details[:300]!r}"
    assert fuzz.cluster.coordinator.process.poll() is None, f"the coordinator died; the last call was to {name}"
    assert outcome.code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), f"an error escaped a handler: {said}"
    assert outcome.code is not grpc.StatusCode.DEADLINE_EXCEEDED, f"a handler hung: {said}"
    assert outcome.code is not grpc.StatusCode.UNIMPLEMENTED, f"every method of a served service is implemented: {said}"
    if outcome.code not in (None, grpc.StatusCode.OK):
        assert outcome.details.strip(), f"a rejection must say what was wrong: {said}"
    request_class = message_factory.GetMessageClass(method.input_type)
    if outcome.code is grpc.StatusCode.RESOURCE_EXHAUSTED and _metadata_bytes(metadata) > METADATA_SOFT_LIMIT_BYTES:
        assert "metadata" in outcome.details, said
        return  # the transport refused the metadata before anything read the request
    authorization = [value for key, value in metadata if key == "authorization"]
    has_valid_token = len(authorization) == 1 and authorization[0] in VALID_AUTHORIZATION
    protected = method.containing_service.full_name in PROTECTED_SERVICES
    if protected and method.client_streaming and not has_valid_token:
        # A one-request method's request is read by the transport before the handler runs (so its size limit and
        # parsing come first); a request stream's handler runs once the metadata is in, and checks the token before
        # it reads a message: without a valid token, whatever the messages (too large, malformed), UNAUTHENTICATED.
        assert outcome.code is grpc.StatusCode.UNAUTHENTICATED, f"a request stream without a valid token: {said}"
        assert "authorization" in outcome.details or "token" in outcome.details, said
        return
    if any(len(frame) > MAX_MESSAGE_BYTES for frame in frames[:1]):
        assert outcome.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in outcome.details, said
        return
    if not _parses(request_class, frames[0]):
        assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, (
            f"a request that is not valid protobuf must be INVALID_ARGUMENT: {said}"
        )
        assert f"not a valid {method.input_type.full_name}" in outcome.details, said
        return
    if any(not _parses(request_class, frame) for frame in frames):
        assert outcome.code not in (None, grpc.StatusCode.OK), f"a stream with a malformed message was accepted: {said}"
    if protected and not has_valid_token:
        assert outcome.code is grpc.StatusCode.UNAUTHENTICATED, f"called without a valid token: {said}"
        assert "authorization" in outcome.details or "token" in outcome.details, said


def _parses(request_class, data: bytes) -> bool:
    try:
        request_class.FromString(data)
    except Exception:  # noqa: BLE001 - DecodeError, or RecursionError from the pure-Python parser
        return False
    return True


# -- the tests ---------------------------------------------------------------------------------------


def tokens_entry(user: str, token: str, role: str) -> str:
    return f'[[tokens]]\nuser = "{user}"\nrole = "{role}"\nsha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n\n'


@pytest.fixture(scope="module")
def target(tmp_path_factory, pytestconfig):
    """A coordinator with tokens, a draining node of a real agent running an interactive job, two pending jobs; its
    fuzzer; what must stay."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "tokens.toml").write_text("".join(tokens_entry(user, token, role) for user, (token, role) in TOKENS.items()))
    cluster = LocalCluster(root, token=ADMIN_TOKEN)
    cluster.start_coordinator("--tokens-file", str(root / "tokens.toml"))
    cluster.add_agent(NODE_ID, 2)
    cluster.wait_for_nodes(1)
    admin = cluster.client()
    interactive_job_id = admin.submit_job(
        argv=["python3", "-c", KEPT_TERMINAL], gpus=1, name="kept-terminal", interactive=True, attach_grace_seconds=86400
    )
    wait_for(lambda: admin.get_job(interactive_job_id).state == job_pb2.JOB_STATE_RUNNING, 30, what="the interactive job")
    # Draining, so no fuzzed job (random argv) ever runs on this machine; the fuzzing never names it where it could resume it.
    admin.drain_node(NODE_ID, reason="kept out of the fuzzing")
    requirements = {"gpu_model": KEPT_MODEL}
    job_id = admin.submit_job(
        argv=["python3", "-c", "print('kept')"],
        gpus=1,
        name="kept",
        env={"KEPT": "1"},
        requirements=requirements,
        hold_if_too_big=True,
    )
    with gpuorch.Client(cluster.address, timeout=5, token=USER_TOKEN) as user:
        spare_job_id = user.submit_job(argv=["true"], gpus=1, name="spare", requirements=requirements, hold_if_too_big=True)
    kept = KeptData(job_id=job_id, spare_job_id=spare_job_id, interactive_job_id=interactive_job_id, node_id=NODE_ID)
    before = (admin.get_job(job_id), admin.get_node(NODE_ID), admin.get_job(interactive_job_id))
    fuzz = Fuzzer(cluster)
    yield cluster, fuzz, kept, before
    fuzz.close()
    summary = json.dumps(fuzz.summary())
    pytestconfig.stash.setdefault(SUMMARY_LINES, []).append(f"fuzz summary: {summary}")
    if os.environ.get("GPUORCH_FUZZ_SUMMARY"):
        with open(os.environ["GPUORCH_FUZZ_SUMMARY"], "w") as handle:
            handle.write(summary + "\n")
    cluster.stop()


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("GPUORCH_FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)


class Frames(list):
    """The messages of one call; shown shortened, since a falsifying example may hold megabytes."""

    def __repr__(self) -> str:
        return "[" + ", ".join(f"{len(frame)} bytes {frame[:120]!r}{'...' if len(frame) > 120 else ''}" for frame in self) + "]"


def _frames(method: descriptor.MethodDescriptor, frame: st.SearchStrategy[bytes], first: st.SearchStrategy[bytes] | None = None):
    """One request, or for a request stream one to four messages."""
    if not method.client_streaming:
        return frame.map(lambda data: Frames([data]))
    return st.builds(lambda head, tail: Frames([head, *tail]), frame if first is None else first, st.lists(frame, max_size=3))


def _encoded(method: descriptor.MethodDescriptor, kept: KeptData) -> st.SearchStrategy[bytes]:
    return messages(method.input_type, kept, method.name).map(lambda instance: instance.SerializeToString())


def _opening(method: descriptor.MethodDescriptor, kept: KeptData) -> st.SearchStrategy[bytes] | None:
    """A first message of the kind a request stream must start with (an agent's register, a session's open, a relay's
    hello), so that the stream gets past its first check; None for a method with no such rule."""
    first = {
        "Connect": (agent_pb2.Register, "register", agent_pb2.AgentMessage),
        "Attach": (interactive_pb2.OpenSession, "open", interactive_pb2.SessionInput),
        "Exec": (interactive_pb2.OpenSession, "open", interactive_pb2.SessionInput),
        "PortForward": (interactive_pb2.OpenSession, "open", interactive_pb2.SessionInput),
        "NodeRelay": (interactive_pb2.NodeHello, "hello", interactive_pb2.NodeSessionOutput),
    }.get(method.name)
    if first is None:
        return None
    inner, field, outer = first
    drawn = messages(inner.DESCRIPTOR, kept, method.name)
    if inner is interactive_pb2.OpenSession:
        # Mostly a job that exists, so most sessions get past the lookup to the job's state, its owner and the node.
        known = [kept.job_id, kept.spare_job_id] + ([] if method.name in SESSIONS_THAT_ACT else [kept.interactive_job_id])
        drawn = st.builds(_with_job, drawn, st.one_of(st.none(), st.sampled_from(known), st.sampled_from(known)))
    return drawn.map(lambda value: outer(**{field: value}).SerializeToString())


def _with_job(open_session: interactive_pb2.OpenSession, job_id: str | None) -> interactive_pb2.OpenSession:
    if job_id is not None:
        open_session.job_id = job_id
    return open_session


def _method_id(method: descriptor.MethodDescriptor) -> str:
    return f"{method.containing_service.name}.{method.name}"


def fuzz_method(
    fuzz: Fuzzer, method: descriptor.MethodDescriptor, frames: st.SearchStrategy[Frames], metadata: st.SearchStrategy[tuple]
) -> None:
    """Calls `method` with what the strategies draw, checking every outcome; hypothesis shrinks any failure."""

    @FUZZ_SETTINGS
    @given(frames=frames, metadata=metadata)
    def run(frames, metadata):
        check(fuzz, method, frames, metadata, fuzz.call(method, frames, metadata))

    run()


@pytest.mark.parametrize("method", METHODS, ids=_method_id)
def test_random_and_corrupted_bytes(target, method):
    _cluster, fuzz, kept, _ = target
    garbage = garbage_bytes(method.input_type, kept, method.name)
    opening = _opening(method, kept)
    first = st.one_of(garbage, _encoded(method, kept) if opening is None else opening)
    fuzz_method(fuzz, method, _frames(method, garbage, first=first if method.client_streaming else None), VALID_TOKENS)


@pytest.mark.parametrize("method", METHODS, ids=_method_id)
def test_well_formed_hostile_messages(target, method):
    _cluster, fuzz, kept, _ = target
    encoded = _encoded(method, kept)
    opening = _opening(method, kept)
    first = None if opening is None else st.one_of(opening, encoded)
    fuzz_method(fuzz, method, _frames(method, encoded, first=first), VALID_TOKENS)


@pytest.mark.parametrize("method", METHODS, ids=_method_id)
def test_random_metadata(target, method):
    _cluster, fuzz, kept, _ = target
    frame = st.one_of(st.just(b""), _encoded(method, kept))
    opening = _opening(method, kept)
    fuzz_method(fuzz, method, _frames(method, frame, first=None if opening is None else st.one_of(frame, opening)), METADATA)


def test_every_served_service_is_fuzzed(target):
    _cluster, fuzz, _, _ = target
    listing = reflection_pb2.ServerReflectionRequest(list_services="*").SerializeToString()
    method = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].methods_by_name["ServerReflectionInfo"]

    async def served() -> set[str]:
        call = fuzz.channel.stream_stream(
            f"/{method.containing_service.full_name}/{method.name}",
            request_serializer=None,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )()
        await call.write(listing)
        await call.done_writing()
        answer = await call.read()
        return {service.name for service in answer.list_services_response.service}

    assert fuzz.loop.run_until_complete(served()) == {service.full_name for service in SERVICES}


def test_afterwards_the_coordinator_is_healthy_and_its_data_intact(target):
    cluster, fuzz, kept, (job_before, node_before, interactive_before) = target
    if not fuzz.outcomes:
        pytest.skip("run together with the fuzzing tests of this module")
    assert cluster.coordinator.process.poll() is None
    with grpc.insecure_channel(cluster.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    admin = cluster.client()
    job = admin.get_job(kept.job_id)
    assert job.spec == job_before.spec and job.spec.owner == "ops" and list(job.spec.argv) == ["python3", "-c", "print('kept')"]
    assert job.state == job_pb2.JOB_STATE_PENDING and job.attempt == 0
    assert admin.get_job(kept.spare_job_id).spec.argv == ["true"], "the spare job may change state, never its spec"
    node = admin.get_node(NODE_ID)
    assert node.state == cluster_pb2.NODE_STATE_DRAINING and node.state_reason == "kept out of the fuzzing"
    interactive = admin.get_job(kept.interactive_job_id)
    assert interactive.state == job_pb2.JOB_STATE_RUNNING and interactive.attempt == interactive_before.attempt, (
        "the kept terminal's job ran on through every Attach"
    )
    assert [device.uuid for device in node.devices] == [device.uuid for device in node_before.devices]
    sequence = node.last_heartbeat_sequence
    wait_for(
        lambda: admin.get_node(NODE_ID).last_heartbeat_sequence > sequence, what="the kept node's agent to go on heartbeating"
    )
    listed, _ = admin.list_jobs(owner="ops", page_size=1000)
    assert kept.job_id in {job.job_id for job in listed}
    log = cluster.coordinator.output()
    for sign_of_a_crash in ("Traceback", "background loop crashed", "error handling agent message"):
        assert sign_of_a_crash not in log, f"the coordinator log shows {sign_of_a_crash!r}"
