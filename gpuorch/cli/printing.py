"""What gpuctl prints for people: every string escaped, tables aligned, times in one zone."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC

from google.protobuf.json_format import MessageToDict

from gpuorch.clock import SYSTEM_CLOCK, Clock
from gpuorch.v1 import cluster_pb2, job_pb2

GIB = 1024**3
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
TIME_ZONE = {"utc": False}
"""Set once by main(): print times in UTC instead of local time."""


def printable(text: object) -> str:
    """`text` with every C0 and C1 control character (and DEL) escaped as \\n, \\t, \\xNN: names,
    reasons and argv come from users and agents, and an escape sequence in them must never reach
    the terminal raw. Every table and detail view passes what it prints through here."""
    return _CONTROL.sub(lambda match: _NAMED_ESCAPES.get(match.group(), f"\\x{ord(match.group()):02x}"), str(text))


def as_json(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def node_state_name(value: int) -> str:
    return cluster_pb2.NodeState.Name(value).removeprefix("NODE_STATE_")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, headers))] + [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells)


def age(timestamp, clock: Clock = SYSTEM_CLOCK) -> str:
    """How long ago a protobuf Timestamp was, by this machine's wall clock (never negative: the
    coordinator's clock may run a little ahead)."""
    if not timestamp.seconds and not timestamp.nanos:
        return "-"
    return f"{max(0.0, clock.wall() - timestamp.ToNanoseconds() / 1e9):.1f}s ago"


def job_state_name(value: int) -> str:
    return job_pb2.JobState.Name(value).removeprefix("JOB_STATE_")


def stamp(timestamp) -> str:
    """A protobuf Timestamp in local time with its zone (UTC with --utc)."""
    if not timestamp.seconds and not timestamp.nanos:
        return "-"
    moment = timestamp.ToDatetime(tzinfo=UTC)
    if not TIME_ZONE["utc"]:
        moment = moment.astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z")


def duration(seconds: int) -> str:
    """5400 -> "1h30m", 90 -> "1m30s", 2 -> "2s": as --time-limit accepts it back."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return text or "0s"
