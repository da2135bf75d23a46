import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_READY: _ClassVar[NodeState]
    NODE_STATE_SUSPECT: _ClassVar[NodeState]
    NODE_STATE_DOWN: _ClassVar[NodeState]
    NODE_STATE_DRAINING: _ClassVar[NodeState]
    NODE_STATE_DRAINED: _ClassVar[NodeState]

class UsageResolution(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_RESOLUTION_UNSPECIFIED: _ClassVar[UsageResolution]
    USAGE_RESOLUTION_MINUTE: _ClassVar[UsageResolution]
    USAGE_RESOLUTION_HOUR: _ClassVar[UsageResolution]
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_READY: NodeState
NODE_STATE_SUSPECT: NodeState
NODE_STATE_DOWN: NodeState
NODE_STATE_DRAINING: NodeState
NODE_STATE_DRAINED: NodeState
USAGE_RESOLUTION_UNSPECIFIED: UsageResolution
USAGE_RESOLUTION_MINUTE: UsageResolution
USAGE_RESOLUTION_HOUR: UsageResolution

class DeviceInfo(_message.Message):
    __slots__ = ("uuid", "index", "name", "memory_total_bytes", "pci_bus_id", "temperature_limit_celsius", "power_limit_watts")
    UUID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_LIMIT_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_WATTS_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    index: int
    name: str
    memory_total_bytes: int
    pci_bus_id: str
    temperature_limit_celsius: float
    power_limit_watts: float
    def __init__(self, uuid: _Optional[str] = ..., index: _Optional[int] = ..., name: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., pci_bus_id: _Optional[str] = ..., temperature_limit_celsius: _Optional[float] = ..., power_limit_watts: _Optional[float] = ...) -> None: ...

class DeviceTelemetry(_message.Message):
    __slots__ = ("uuid", "memory_used_bytes", "gpu_utilization_percent", "memory_utilization_percent", "temperature_celsius", "power_watts", "ecc_corrected_errors", "ecc_uncorrected_errors", "xid_count", "last_xid", "lost")
    UUID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    POWER_WATTS_FIELD_NUMBER: _ClassVar[int]
    ECC_CORRECTED_ERRORS_FIELD_NUMBER: _ClassVar[int]
    ECC_UNCORRECTED_ERRORS_FIELD_NUMBER: _ClassVar[int]
    XID_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_XID_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    memory_used_bytes: int
    gpu_utilization_percent: float
    memory_utilization_percent: float
    temperature_celsius: float
    power_watts: float
    ecc_corrected_errors: int
    ecc_uncorrected_errors: int
    xid_count: int
    last_xid: int
    lost: bool
    def __init__(self, uuid: _Optional[str] = ..., memory_used_bytes: _Optional[int] = ..., gpu_utilization_percent: _Optional[float] = ..., memory_utilization_percent: _Optional[float] = ..., temperature_celsius: _Optional[float] = ..., power_watts: _Optional[float] = ..., ecc_corrected_errors: _Optional[int] = ..., ecc_uncorrected_errors: _Optional[int] = ..., xid_count: _Optional[int] = ..., last_xid: _Optional[int] = ..., lost: _Optional[bool] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("uuid", "index", "name", "memory_total_bytes", "pci_bus_id", "healthy", "unhealthy_reason", "telemetry", "allocated_job_id", "allocated_attempt", "telemetry_history")
    UUID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    UNHEALTHY_REASON_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_HISTORY_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    index: int
    name: str
    memory_total_bytes: int
    pci_bus_id: str
    healthy: bool
    unhealthy_reason: str
    telemetry: DeviceTelemetry
    allocated_job_id: str
    allocated_attempt: int
    telemetry_history: _containers.RepeatedCompositeFieldContainer[TelemetryPoint]
    def __init__(self, uuid: _Optional[str] = ..., index: _Optional[int] = ..., name: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., pci_bus_id: _Optional[str] = ..., healthy: _Optional[bool] = ..., unhealthy_reason: _Optional[str] = ..., telemetry: _Optional[_Union[DeviceTelemetry, _Mapping]] = ..., allocated_job_id: _Optional[str] = ..., allocated_attempt: _Optional[int] = ..., telemetry_history: _Optional[_Iterable[_Union[TelemetryPoint, _Mapping]]] = ...) -> None: ...

class TelemetryPoint(_message.Message):
    __slots__ = ("time", "gpu_utilization_percent", "memory_used_bytes", "temperature_celsius", "power_watts")
    TIME_FIELD_NUMBER: _ClassVar[int]
    GPU_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    POWER_WATTS_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    gpu_utilization_percent: float
    memory_used_bytes: int
    temperature_celsius: float
    power_watts: float
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gpu_utilization_percent: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., temperature_celsius: _Optional[float] = ..., power_watts: _Optional[float] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("node_id", "state", "hostname", "addresses", "devices", "heartbeat_interval_seconds", "last_heartbeat_time", "registered_time", "last_heartbeat_sequence", "state_reason", "drained", "agent_version", "pool")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_TIME_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    state: NodeState
    hostname: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    heartbeat_interval_seconds: float
    last_heartbeat_time: _timestamp_pb2.Timestamp
    registered_time: _timestamp_pb2.Timestamp
    last_heartbeat_sequence: int
    state_reason: str
    drained: bool
    agent_version: str
    pool: str
    def __init__(self, node_id: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., hostname: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., heartbeat_interval_seconds: _Optional[float] = ..., last_heartbeat_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., registered_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_heartbeat_sequence: _Optional[int] = ..., state_reason: _Optional[str] = ..., drained: _Optional[bool] = ..., agent_version: _Optional[str] = ..., pool: _Optional[str] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ("states",)
    STATES_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[NodeState]
    def __init__(self, states: _Optional[_Iterable[_Union[NodeState, str]]] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class GetNodeRequest(_message.Message):
    __slots__ = ("node_id", "include_telemetry_history")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TELEMETRY_HISTORY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    include_telemetry_history: bool
    def __init__(self, node_id: _Optional[str] = ..., include_telemetry_history: _Optional[bool] = ...) -> None: ...

class GetNodeResponse(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: Node
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ...) -> None: ...

class DrainNodeRequest(_message.Message):
    __slots__ = ("node_id", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DrainNodeResponse(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: Node
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ...) -> None: ...

class ResumeNodeRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class ResumeNodeResponse(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: Node
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ...) -> None: ...

class GetClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("nodes_by_state", "nodes_total", "gpus_total", "gpus_healthy", "gpus_free", "memory_total_bytes", "memory_used_bytes", "mean_gpu_utilization_percent", "heartbeats_per_second", "heartbeat_lag_p50_ms", "heartbeat_lag_p99_ms", "jobs_by_state", "coordinator_epoch")
    class NodesByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class JobsByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODES_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    NODES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GPUS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GPUS_HEALTHY_FIELD_NUMBER: _ClassVar[int]
    GPUS_FREE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEAN_GPU_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEATS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_LAG_P50_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_LAG_P99_MS_FIELD_NUMBER: _ClassVar[int]
    JOBS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_EPOCH_FIELD_NUMBER: _ClassVar[int]
    nodes_by_state: _containers.ScalarMap[str, int]
    nodes_total: int
    gpus_total: int
    gpus_healthy: int
    gpus_free: int
    memory_total_bytes: int
    memory_used_bytes: int
    mean_gpu_utilization_percent: float
    heartbeats_per_second: float
    heartbeat_lag_p50_ms: float
    heartbeat_lag_p99_ms: float
    jobs_by_state: _containers.ScalarMap[str, int]
    coordinator_epoch: int
    def __init__(self, nodes_by_state: _Optional[_Mapping[str, int]] = ..., nodes_total: _Optional[int] = ..., gpus_total: _Optional[int] = ..., gpus_healthy: _Optional[int] = ..., gpus_free: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., mean_gpu_utilization_percent: _Optional[float] = ..., heartbeats_per_second: _Optional[float] = ..., heartbeat_lag_p50_ms: _Optional[float] = ..., heartbeat_lag_p99_ms: _Optional[float] = ..., jobs_by_state: _Optional[_Mapping[str, int]] = ..., coordinator_epoch: _Optional[int] = ...) -> None: ...

class GetClusterStatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: ClusterStatus
    def __init__(self, status: _Optional[_Union[ClusterStatus, _Mapping]] = ...) -> None: ...

class GetUsageHistoryRequest(_message.Message):
    __slots__ = ("resolution", "start_time", "end_time")
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    resolution: UsageResolution
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, resolution: _Optional[_Union[UsageResolution, str]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UsagePoint(_message.Message):
    __slots__ = ("start_time", "covered_seconds", "gpus_total", "gpus_allocated", "mean_gpu_utilization_percent", "allocated_gpu_seconds")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    COVERED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GPUS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GPUS_ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    MEAN_GPU_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_GPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    covered_seconds: float
    gpus_total: float
    gpus_allocated: float
    mean_gpu_utilization_percent: float
    allocated_gpu_seconds: float
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., covered_seconds: _Optional[float] = ..., gpus_total: _Optional[float] = ..., gpus_allocated: _Optional[float] = ..., mean_gpu_utilization_percent: _Optional[float] = ..., allocated_gpu_seconds: _Optional[float] = ...) -> None: ...

class UsageTotal(_message.Message):
    __slots__ = ("name", "gpu_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    gpu_seconds: float
    def __init__(self, name: _Optional[str] = ..., gpu_seconds: _Optional[float] = ...) -> None: ...

class GetUsageHistoryResponse(_message.Message):
    __slots__ = ("resolution", "point_seconds", "points", "owners", "pools", "sample_interval_seconds", "history_start_time")
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    POINT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_START_TIME_FIELD_NUMBER: _ClassVar[int]
    resolution: UsageResolution
    point_seconds: int
    points: _containers.RepeatedCompositeFieldContainer[UsagePoint]
    owners: _containers.RepeatedCompositeFieldContainer[UsageTotal]
    pools: _containers.RepeatedCompositeFieldContainer[UsageTotal]
    sample_interval_seconds: float
    history_start_time: _timestamp_pb2.Timestamp
    def __init__(self, resolution: _Optional[_Union[UsageResolution, str]] = ..., point_seconds: _Optional[int] = ..., points: _Optional[_Iterable[_Union[UsagePoint, _Mapping]]] = ..., owners: _Optional[_Iterable[_Union[UsageTotal, _Mapping]]] = ..., pools: _Optional[_Iterable[_Union[UsageTotal, _Mapping]]] = ..., sample_interval_seconds: _Optional[float] = ..., history_start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WhoAmIRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WhoAmIResponse(_message.Message):
    __slots__ = ("user", "role", "authenticated")
    USER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    AUTHENTICATED_FIELD_NUMBER: _ClassVar[int]
    user: str
    role: str
    authenticated: bool
    def __init__(self, user: _Optional[str] = ..., role: _Optional[str] = ..., authenticated: _Optional[bool] = ...) -> None: ...
