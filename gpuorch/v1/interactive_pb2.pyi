from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_KIND_UNSPECIFIED: _ClassVar[SessionKind]
    SESSION_KIND_ATTACH: _ClassVar[SessionKind]
    SESSION_KIND_EXEC: _ClassVar[SessionKind]
    SESSION_KIND_PORT_FORWARD: _ClassVar[SessionKind]
SESSION_KIND_UNSPECIFIED: SessionKind
SESSION_KIND_ATTACH: SessionKind
SESSION_KIND_EXEC: SessionKind
SESSION_KIND_PORT_FORWARD: SessionKind

class TerminalSize(_message.Message):
    __slots__ = ("rows", "columns")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    columns: int
    def __init__(self, rows: _Optional[int] = ..., columns: _Optional[int] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("job_id", "rank", "argv", "tty", "size", "port")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    rank: int
    argv: _containers.RepeatedScalarFieldContainer[str]
    tty: bool
    size: TerminalSize
    port: int
    def __init__(self, job_id: _Optional[str] = ..., rank: _Optional[int] = ..., argv: _Optional[_Iterable[str]] = ..., tty: _Optional[bool] = ..., size: _Optional[_Union[TerminalSize, _Mapping]] = ..., port: _Optional[int] = ...) -> None: ...

class SessionInput(_message.Message):
    __slots__ = ("open", "data", "resize", "end_of_input", "signal")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    END_OF_INPUT_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    data: bytes
    resize: TerminalSize
    end_of_input: bool
    signal: int
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., data: _Optional[bytes] = ..., resize: _Optional[_Union[TerminalSize, _Mapping]] = ..., end_of_input: _Optional[bool] = ..., signal: _Optional[int] = ...) -> None: ...

class SessionStarted(_message.Message):
    __slots__ = ("node_id", "attempt", "rank", "pid")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    attempt: int
    rank: int
    pid: int
    def __init__(self, node_id: _Optional[str] = ..., attempt: _Optional[int] = ..., rank: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...

class SessionEnded(_message.Message):
    __slots__ = ("exit_code", "signal", "message", "process_exited")
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROCESS_EXITED_FIELD_NUMBER: _ClassVar[int]
    exit_code: int
    signal: int
    message: str
    process_exited: bool
    def __init__(self, exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., message: _Optional[str] = ..., process_exited: _Optional[bool] = ...) -> None: ...

class SessionOutput(_message.Message):
    __slots__ = ("started", "data", "error_data", "ended")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ERROR_DATA_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    started: SessionStarted
    data: bytes
    error_data: bytes
    ended: SessionEnded
    def __init__(self, started: _Optional[_Union[SessionStarted, _Mapping]] = ..., data: _Optional[bytes] = ..., error_data: _Optional[bytes] = ..., ended: _Optional[_Union[SessionEnded, _Mapping]] = ...) -> None: ...

class NodeSessionRequest(_message.Message):
    __slots__ = ("session_id", "secret", "kind", "job_id", "attempt", "rank", "argv", "tty", "size", "port")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    secret: bytes
    kind: SessionKind
    job_id: str
    attempt: int
    rank: int
    argv: _containers.RepeatedScalarFieldContainer[str]
    tty: bool
    size: TerminalSize
    port: int
    def __init__(self, session_id: _Optional[int] = ..., secret: _Optional[bytes] = ..., kind: _Optional[_Union[SessionKind, str]] = ..., job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., rank: _Optional[int] = ..., argv: _Optional[_Iterable[str]] = ..., tty: _Optional[bool] = ..., size: _Optional[_Union[TerminalSize, _Mapping]] = ..., port: _Optional[int] = ...) -> None: ...

class NodeHello(_message.Message):
    __slots__ = ("session_id", "secret", "node_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    secret: bytes
    node_id: str
    def __init__(self, session_id: _Optional[int] = ..., secret: _Optional[bytes] = ..., node_id: _Optional[str] = ...) -> None: ...

class NodeSessionOutput(_message.Message):
    __slots__ = ("hello", "output")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    hello: NodeHello
    output: SessionOutput
    def __init__(self, hello: _Optional[_Union[NodeHello, _Mapping]] = ..., output: _Optional[_Union[SessionOutput, _Mapping]] = ...) -> None: ...
