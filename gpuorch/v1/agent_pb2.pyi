import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from gpuorch.v1 import cluster_pb2 as _cluster_pb2
from gpuorch.v1 import interactive_pb2 as _interactive_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_STATE_RUNNING: _ClassVar[TaskState]
    TASK_STATE_EXITED: _ClassVar[TaskState]
    TASK_STATE_FAILED_TO_START: _ClassVar[TaskState]
    TASK_STATE_REJECTED: _ClassVar[TaskState]
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_RUNNING: TaskState
TASK_STATE_EXITED: TaskState
TASK_STATE_FAILED_TO_START: TaskState
TASK_STATE_REJECTED: TaskState

class Register(_message.Message):
    __slots__ = ("node_id", "hostname", "addresses", "devices", "heartbeat_interval_seconds", "agent_version", "tasks", "pool")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    hostname: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    devices: _containers.RepeatedCompositeFieldContainer[_cluster_pb2.DeviceInfo]
    heartbeat_interval_seconds: float
    agent_version: str
    tasks: _containers.RepeatedCompositeFieldContainer[TaskStatus]
    pool: str
    def __init__(self, node_id: _Optional[str] = ..., hostname: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., devices: _Optional[_Iterable[_Union[_cluster_pb2.DeviceInfo, _Mapping]]] = ..., heartbeat_interval_seconds: _Optional[float] = ..., agent_version: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[TaskStatus, _Mapping]]] = ..., pool: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sequence", "sent_time", "devices", "progress")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SENT_TIME_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    sent_time: _timestamp_pb2.Timestamp
    devices: _containers.RepeatedCompositeFieldContainer[_cluster_pb2.DeviceTelemetry]
    progress: _containers.RepeatedCompositeFieldContainer[RankProgress]
    def __init__(self, sequence: _Optional[int] = ..., sent_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., devices: _Optional[_Iterable[_Union[_cluster_pb2.DeviceTelemetry, _Mapping]]] = ..., progress: _Optional[_Iterable[_Union[RankProgress, _Mapping]]] = ...) -> None: ...

class RankProgress(_message.Message):
    __slots__ = ("job_id", "attempt", "rank", "last_progress_time", "step", "samples", "step_seconds", "scalars")
    class ScalarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LAST_PROGRESS_TIME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    rank: int
    last_progress_time: _timestamp_pb2.Timestamp
    step: int
    samples: int
    step_seconds: float
    scalars: _containers.ScalarMap[str, float]
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., rank: _Optional[int] = ..., last_progress_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., step: _Optional[int] = ..., samples: _Optional[int] = ..., step_seconds: _Optional[float] = ..., scalars: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TaskStatus(_message.Message):
    __slots__ = ("job_id", "attempt", "rank", "state", "exit_code", "signal", "message", "pid", "working_dir", "time_limited", "result_json", "starting")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMITED_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    STARTING_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    rank: int
    state: TaskState
    exit_code: int
    signal: int
    message: str
    pid: int
    working_dir: str
    time_limited: bool
    result_json: str
    starting: bool
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., rank: _Optional[int] = ..., state: _Optional[_Union[TaskState, str]] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., message: _Optional[str] = ..., pid: _Optional[int] = ..., working_dir: _Optional[str] = ..., time_limited: _Optional[bool] = ..., result_json: _Optional[str] = ..., starting: _Optional[bool] = ...) -> None: ...

class LogChunk(_message.Message):
    __slots__ = ("request_id", "data", "offset", "file_size", "error", "running")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    data: bytes
    offset: int
    file_size: int
    error: str
    running: bool
    def __init__(self, request_id: _Optional[int] = ..., data: _Optional[bytes] = ..., offset: _Optional[int] = ..., file_size: _Optional[int] = ..., error: _Optional[str] = ..., running: _Optional[bool] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("register", "heartbeat", "task_status", "log_chunk")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    TASK_STATUS_FIELD_NUMBER: _ClassVar[int]
    LOG_CHUNK_FIELD_NUMBER: _ClassVar[int]
    register: Register
    heartbeat: Heartbeat
    task_status: TaskStatus
    log_chunk: LogChunk
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., task_status: _Optional[_Union[TaskStatus, _Mapping]] = ..., log_chunk: _Optional[_Union[LogChunk, _Mapping]] = ...) -> None: ...

class RegisterAck(_message.Message):
    __slots__ = ("heartbeat_interval_seconds", "coordinator_epoch", "drained", "owners_authenticated", "down_after_seconds")
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_EPOCH_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    OWNERS_AUTHENTICATED_FIELD_NUMBER: _ClassVar[int]
    DOWN_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_seconds: float
    coordinator_epoch: int
    drained: bool
    owners_authenticated: bool
    down_after_seconds: float
    def __init__(self, heartbeat_interval_seconds: _Optional[float] = ..., coordinator_epoch: _Optional[int] = ..., drained: _Optional[bool] = ..., owners_authenticated: _Optional[bool] = ..., down_after_seconds: _Optional[float] = ...) -> None: ...

class LaunchTask(_message.Message):
    __slots__ = ("job_id", "attempt", "argv", "working_dir", "ranks", "owner", "env", "submit_dir", "pids_max", "memory_max_bytes", "time_limit_seconds", "stop_grace_seconds", "dependency_results_json", "interactive")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_DIR_FIELD_NUMBER: _ClassVar[int]
    PIDS_MAX_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STOP_GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEPENDENCY_RESULTS_JSON_FIELD_NUMBER: _ClassVar[int]
    INTERACTIVE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    argv: _containers.RepeatedScalarFieldContainer[str]
    working_dir: str
    ranks: _containers.RepeatedCompositeFieldContainer[RankLaunch]
    owner: str
    env: _containers.ScalarMap[str, str]
    submit_dir: str
    pids_max: int
    memory_max_bytes: int
    time_limit_seconds: float
    stop_grace_seconds: float
    dependency_results_json: str
    interactive: bool
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., argv: _Optional[_Iterable[str]] = ..., working_dir: _Optional[str] = ..., ranks: _Optional[_Iterable[_Union[RankLaunch, _Mapping]]] = ..., owner: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., submit_dir: _Optional[str] = ..., pids_max: _Optional[int] = ..., memory_max_bytes: _Optional[int] = ..., time_limit_seconds: _Optional[float] = ..., stop_grace_seconds: _Optional[float] = ..., dependency_results_json: _Optional[str] = ..., interactive: _Optional[bool] = ...) -> None: ...

class RankLaunch(_message.Message):
    __slots__ = ("rank", "local_rank", "env")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    rank: int
    local_rank: int
    env: _containers.ScalarMap[str, str]
    def __init__(self, rank: _Optional[int] = ..., local_rank: _Optional[int] = ..., env: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StopTask(_message.Message):
    __slots__ = ("job_id", "attempt", "grace_seconds", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    grace_seconds: float
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., grace_seconds: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class ForgetAttempt(_message.Message):
    __slots__ = ("job_id", "attempt")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class ReadLogs(_message.Message):
    __slots__ = ("request_id", "job_id", "attempt", "rank", "offset", "max_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    job_id: str
    attempt: int
    rank: int
    offset: int
    max_bytes: int
    def __init__(self, request_id: _Optional[int] = ..., job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., rank: _Optional[int] = ..., offset: _Optional[int] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class CoordinatorMessage(_message.Message):
    __slots__ = ("register_ack", "launch_task", "stop_task", "read_logs", "forget_attempt", "open_session")
    REGISTER_ACK_FIELD_NUMBER: _ClassVar[int]
    LAUNCH_TASK_FIELD_NUMBER: _ClassVar[int]
    STOP_TASK_FIELD_NUMBER: _ClassVar[int]
    READ_LOGS_FIELD_NUMBER: _ClassVar[int]
    FORGET_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSION_FIELD_NUMBER: _ClassVar[int]
    register_ack: RegisterAck
    launch_task: LaunchTask
    stop_task: StopTask
    read_logs: ReadLogs
    forget_attempt: ForgetAttempt
    open_session: _interactive_pb2.NodeSessionRequest
    def __init__(self, register_ack: _Optional[_Union[RegisterAck, _Mapping]] = ..., launch_task: _Optional[_Union[LaunchTask, _Mapping]] = ..., stop_task: _Optional[_Union[StopTask, _Mapping]] = ..., read_logs: _Optional[_Union[ReadLogs, _Mapping]] = ..., forget_attempt: _Optional[_Union[ForgetAttempt, _Mapping]] = ..., open_session: _Optional[_Union[_interactive_pb2.NodeSessionRequest, _Mapping]] = ...) -> None: ...
