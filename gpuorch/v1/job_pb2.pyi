import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_PENDING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class StragglerAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STRAGGLER_ACTION_UNSPECIFIED: _ClassVar[StragglerAction]
    STRAGGLER_ACTION_RESTART: _ClassVar[StragglerAction]

class DependencyCondition(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEPENDENCY_CONDITION_UNSPECIFIED: _ClassVar[DependencyCondition]
    DEPENDENCY_CONDITION_OK: _ClassVar[DependencyCondition]
    DEPENDENCY_CONDITION_FAIL: _ClassVar[DependencyCondition]
    DEPENDENCY_CONDITION_ANY: _ClassVar[DependencyCondition]

class UsageGroupBy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_GROUP_BY_UNSPECIFIED: _ClassVar[UsageGroupBy]
    USAGE_GROUP_BY_OWNER: _ClassVar[UsageGroupBy]
    USAGE_GROUP_BY_POOL: _ClassVar[UsageGroupBy]
    USAGE_GROUP_BY_JOB: _ClassVar[UsageGroupBy]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_PENDING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
STRAGGLER_ACTION_UNSPECIFIED: StragglerAction
STRAGGLER_ACTION_RESTART: StragglerAction
DEPENDENCY_CONDITION_UNSPECIFIED: DependencyCondition
DEPENDENCY_CONDITION_OK: DependencyCondition
DEPENDENCY_CONDITION_FAIL: DependencyCondition
DEPENDENCY_CONDITION_ANY: DependencyCondition
USAGE_GROUP_BY_UNSPECIFIED: UsageGroupBy
USAGE_GROUP_BY_OWNER: UsageGroupBy
USAGE_GROUP_BY_POOL: UsageGroupBy
USAGE_GROUP_BY_JOB: UsageGroupBy

class JobRequirements(_message.Message):
    __slots__ = ("min_memory_per_gpu_bytes", "gpu_model")
    MIN_MEMORY_PER_GPU_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    min_memory_per_gpu_bytes: int
    gpu_model: str
    def __init__(self, min_memory_per_gpu_bytes: _Optional[int] = ..., gpu_model: _Optional[str] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("name", "argv", "env", "working_dir", "gpus", "gpus_per_node", "min_gpus", "priority", "max_restarts", "backend", "requirements", "owner", "estimated_runtime_seconds", "spread", "progress_timeout_seconds", "hold_if_too_big", "submit_dir", "pids_max", "memory_max_bytes", "pool", "time_limit_seconds", "non_preemptible", "on_straggler", "idle_timeout_minutes", "idle_exempt", "gpu_memory_fraction", "array", "after", "interactive", "attach_grace_seconds")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    GPUS_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    MIN_GPUS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    REQUIREMENTS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_RUNTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SPREAD_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HOLD_IF_TOO_BIG_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_DIR_FIELD_NUMBER: _ClassVar[int]
    PIDS_MAX_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NON_PREEMPTIBLE_FIELD_NUMBER: _ClassVar[int]
    ON_STRAGGLER_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_MINUTES_FIELD_NUMBER: _ClassVar[int]
    IDLE_EXEMPT_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    INTERACTIVE_FIELD_NUMBER: _ClassVar[int]
    ATTACH_GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    argv: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    working_dir: str
    gpus: int
    gpus_per_node: int
    min_gpus: int
    priority: int
    max_restarts: int
    backend: str
    requirements: JobRequirements
    owner: str
    estimated_runtime_seconds: int
    spread: bool
    progress_timeout_seconds: int
    hold_if_too_big: bool
    submit_dir: str
    pids_max: int
    memory_max_bytes: int
    pool: str
    time_limit_seconds: int
    non_preemptible: bool
    on_straggler: StragglerAction
    idle_timeout_minutes: float
    idle_exempt: bool
    gpu_memory_fraction: float
    array: JobArray
    after: _containers.RepeatedCompositeFieldContainer[JobDependency]
    interactive: bool
    attach_grace_seconds: int
    def __init__(self, name: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., working_dir: _Optional[str] = ..., gpus: _Optional[int] = ..., gpus_per_node: _Optional[int] = ..., min_gpus: _Optional[int] = ..., priority: _Optional[int] = ..., max_restarts: _Optional[int] = ..., backend: _Optional[str] = ..., requirements: _Optional[_Union[JobRequirements, _Mapping]] = ..., owner: _Optional[str] = ..., estimated_runtime_seconds: _Optional[int] = ..., spread: _Optional[bool] = ..., progress_timeout_seconds: _Optional[int] = ..., hold_if_too_big: _Optional[bool] = ..., submit_dir: _Optional[str] = ..., pids_max: _Optional[int] = ..., memory_max_bytes: _Optional[int] = ..., pool: _Optional[str] = ..., time_limit_seconds: _Optional[int] = ..., non_preemptible: _Optional[bool] = ..., on_straggler: _Optional[_Union[StragglerAction, str]] = ..., idle_timeout_minutes: _Optional[float] = ..., idle_exempt: _Optional[bool] = ..., gpu_memory_fraction: _Optional[float] = ..., array: _Optional[_Union[JobArray, _Mapping]] = ..., after: _Optional[_Iterable[_Union[JobDependency, _Mapping]]] = ..., interactive: _Optional[bool] = ..., attach_grace_seconds: _Optional[int] = ...) -> None: ...

class JobTelemetry(_message.Message):
    __slots__ = ("steps_per_second", "samples_per_second", "step", "scalars", "ranks", "stragglers", "idle", "low_utilization_since", "gpu_utilization_percent", "update_time")
    class ScalarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    STRAGGLERS_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    LOW_UTILIZATION_SINCE_FIELD_NUMBER: _ClassVar[int]
    GPU_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    steps_per_second: float
    samples_per_second: float
    step: int
    scalars: _containers.ScalarMap[str, float]
    ranks: _containers.RepeatedCompositeFieldContainer[RankTelemetry]
    stragglers: _containers.RepeatedCompositeFieldContainer[Straggler]
    idle: bool
    low_utilization_since: _timestamp_pb2.Timestamp
    gpu_utilization_percent: float
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, steps_per_second: _Optional[float] = ..., samples_per_second: _Optional[float] = ..., step: _Optional[int] = ..., scalars: _Optional[_Mapping[str, float]] = ..., ranks: _Optional[_Iterable[_Union[RankTelemetry, _Mapping]]] = ..., stragglers: _Optional[_Iterable[_Union[Straggler, _Mapping]]] = ..., idle: _Optional[bool] = ..., low_utilization_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gpu_utilization_percent: _Optional[float] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RankTelemetry(_message.Message):
    __slots__ = ("rank", "node_id", "device_uuid", "step", "step_seconds", "slow_windows")
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SLOW_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    node_id: str
    device_uuid: str
    step: int
    step_seconds: float
    slow_windows: int
    def __init__(self, rank: _Optional[int] = ..., node_id: _Optional[str] = ..., device_uuid: _Optional[str] = ..., step: _Optional[int] = ..., step_seconds: _Optional[float] = ..., slow_windows: _Optional[int] = ...) -> None: ...

class Straggler(_message.Message):
    __slots__ = ("rank", "node_id", "device_uuid", "step_seconds", "median_step_seconds", "flag_time", "attempt")
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FLAG_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    rank: int
    node_id: str
    device_uuid: str
    step_seconds: float
    median_step_seconds: float
    flag_time: _timestamp_pb2.Timestamp
    attempt: int
    def __init__(self, rank: _Optional[int] = ..., node_id: _Optional[str] = ..., device_uuid: _Optional[str] = ..., step_seconds: _Optional[float] = ..., median_step_seconds: _Optional[float] = ..., flag_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt: _Optional[int] = ...) -> None: ...

class JobArray(_message.Message):
    __slots__ = ("first", "last", "step", "max_running")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    first: int
    last: int
    step: int
    max_running: int
    def __init__(self, first: _Optional[int] = ..., last: _Optional[int] = ..., step: _Optional[int] = ..., max_running: _Optional[int] = ...) -> None: ...

class JobDependency(_message.Message):
    __slots__ = ("job_id", "condition")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    condition: DependencyCondition
    def __init__(self, job_id: _Optional[str] = ..., condition: _Optional[_Union[DependencyCondition, str]] = ...) -> None: ...

class ArrayTask(_message.Message):
    __slots__ = ("array_id", "index", "size", "max_running", "position")
    ARRAY_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    array_id: str
    index: int
    size: int
    max_running: int
    position: int
    def __init__(self, array_id: _Optional[str] = ..., index: _Optional[int] = ..., size: _Optional[int] = ..., max_running: _Optional[int] = ..., position: _Optional[int] = ...) -> None: ...

class ArraySummary(_message.Message):
    __slots__ = ("size", "pending", "running", "succeeded", "failed", "cancelled", "max_running")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    size: int
    pending: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    max_running: int
    def __init__(self, size: _Optional[int] = ..., pending: _Optional[int] = ..., running: _Optional[int] = ..., succeeded: _Optional[int] = ..., failed: _Optional[int] = ..., cancelled: _Optional[int] = ..., max_running: _Optional[int] = ...) -> None: ...

class Attempt(_message.Message):
    __slots__ = ("attempt", "placement", "start_time", "end_time", "restart_reason", "end_reason", "working_dirs", "usage")
    class WorkingDirsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    RESTART_REASON_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIRS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    placement: Placement
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    restart_reason: str
    end_reason: str
    working_dirs: _containers.ScalarMap[str, str]
    usage: AttemptUsage
    def __init__(self, attempt: _Optional[int] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., restart_reason: _Optional[str] = ..., end_reason: _Optional[str] = ..., working_dirs: _Optional[_Mapping[str, str]] = ..., usage: _Optional[_Union[AttemptUsage, _Mapping]] = ...) -> None: ...

class AttemptUsage(_message.Message):
    __slots__ = ("utilization_percent_seconds", "sampled_seconds", "peak_memory_bytes")
    UTILIZATION_PERCENT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    utilization_percent_seconds: float
    sampled_seconds: float
    peak_memory_bytes: int
    def __init__(self, utilization_percent_seconds: _Optional[float] = ..., sampled_seconds: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ...) -> None: ...

class NodeAssignment(_message.Message):
    __slots__ = ("node_id", "node_rank", "device_uuids", "first_rank", "device_indexes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_RANK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUIDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_RANK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_INDEXES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    node_rank: int
    device_uuids: _containers.RepeatedScalarFieldContainer[str]
    first_rank: int
    device_indexes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, node_id: _Optional[str] = ..., node_rank: _Optional[int] = ..., device_uuids: _Optional[_Iterable[str]] = ..., first_rank: _Optional[int] = ..., device_indexes: _Optional[_Iterable[int]] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("nodes", "master_addr", "master_port", "world_size")
    NODES_FIELD_NUMBER: _ClassVar[int]
    MASTER_ADDR_FIELD_NUMBER: _ClassVar[int]
    MASTER_PORT_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeAssignment]
    master_addr: str
    master_port: int
    world_size: int
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeAssignment, _Mapping]]] = ..., master_addr: _Optional[str] = ..., master_port: _Optional[int] = ..., world_size: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "spec", "state", "attempt", "reason", "placement", "submit_time", "start_time", "end_time", "attempts", "restarts", "restart_not_before", "env_redacted", "pending_restart_reason", "estimated_start_time", "array_task", "array", "result_json", "dependencies_met", "telemetry", "excluded_device_uuids")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    RESTART_NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ENV_REDACTED_FIELD_NUMBER: _ClassVar[int]
    PENDING_RESTART_REASON_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_START_TIME_FIELD_NUMBER: _ClassVar[int]
    ARRAY_TASK_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    DEPENDENCIES_MET_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_DEVICE_UUIDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: JobSpec
    state: JobState
    attempt: int
    reason: str
    placement: Placement
    submit_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    attempts: _containers.RepeatedCompositeFieldContainer[Attempt]
    restarts: int
    restart_not_before: _timestamp_pb2.Timestamp
    env_redacted: bool
    pending_restart_reason: str
    estimated_start_time: _timestamp_pb2.Timestamp
    array_task: ArrayTask
    array: ArraySummary
    result_json: str
    dependencies_met: _containers.RepeatedScalarFieldContainer[str]
    telemetry: JobTelemetry
    excluded_device_uuids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., attempt: _Optional[int] = ..., reason: _Optional[str] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., submit_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[_Iterable[_Union[Attempt, _Mapping]]] = ..., restarts: _Optional[int] = ..., restart_not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., env_redacted: _Optional[bool] = ..., pending_restart_reason: _Optional[str] = ..., estimated_start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., array_task: _Optional[_Union[ArrayTask, _Mapping]] = ..., array: _Optional[_Union[ArraySummary, _Mapping]] = ..., result_json: _Optional[str] = ..., dependencies_met: _Optional[_Iterable[str]] = ..., telemetry: _Optional[_Union[JobTelemetry, _Mapping]] = ..., excluded_device_uuids: _Optional[_Iterable[str]] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec", "client_request_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    client_request_id: str
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., client_request_id: _Optional[str] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("states", "owner", "page_size", "page_token", "active_since", "active_until", "tasks", "array_id")
    STATES_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SINCE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_UNTIL_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    ARRAY_ID_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[JobState]
    owner: str
    page_size: int
    page_token: str
    active_since: _timestamp_pb2.Timestamp
    active_until: _timestamp_pb2.Timestamp
    tasks: bool
    array_id: str
    def __init__(self, states: _Optional[_Iterable[_Union[JobState, str]]] = ..., owner: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., active_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tasks: _Optional[bool] = ..., array_id: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class SetJobPriorityRequest(_message.Message):
    __slots__ = ("job_id", "priority")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    priority: int
    def __init__(self, job_id: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class SetJobPriorityResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobLogsRequest(_message.Message):
    __slots__ = ("job_id", "rank", "attempt", "tail_bytes", "follow", "tail_lines")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TAIL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    rank: int
    attempt: int
    tail_bytes: int
    follow: bool
    tail_lines: int
    def __init__(self, job_id: _Optional[str] = ..., rank: _Optional[int] = ..., attempt: _Optional[int] = ..., tail_bytes: _Optional[int] = ..., follow: _Optional[bool] = ..., tail_lines: _Optional[int] = ...) -> None: ...

class GetJobLogsResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("group_by", "since", "until", "owner")
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    group_by: UsageGroupBy
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    owner: str
    def __init__(self, group_by: _Optional[_Union[UsageGroupBy, str]] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., owner: _Optional[str] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("key", "jobs", "attempts", "gpu_seconds", "mean_gpu_utilization_percent", "peak_memory_bytes", "owner", "pool")
    KEY_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    GPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEAN_GPU_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    key: str
    jobs: int
    attempts: int
    gpu_seconds: float
    mean_gpu_utilization_percent: float
    peak_memory_bytes: int
    owner: str
    pool: str
    def __init__(self, key: _Optional[str] = ..., jobs: _Optional[int] = ..., attempts: _Optional[int] = ..., gpu_seconds: _Optional[float] = ..., mean_gpu_utilization_percent: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ..., owner: _Optional[str] = ..., pool: _Optional[str] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("rows", "total", "since", "until")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    total: UsageRow
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., total: _Optional[_Union[UsageRow, _Mapping]] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
