"""What the SDK turns into request fields: enum names, times, and paging through ListJobs."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from google.protobuf import timestamp_pb2

from gpuorch.v1 import job_pb2

When = float | datetime.datetime | None
"""A time as the SDK takes it: wall seconds since the epoch, a datetime (naive = local time), or None (unbounded)."""


def enum_values(enum, prefix: str, names: Iterable[str | int]) -> list[Any]:
    """Accepts enum numbers or names with or without the prefix ("READY", "NODE_STATE_READY").

    Returns the enum's numbers. Typed Any: each request's stub wants its own enum class there,
    which at run time is a plain int."""
    values: list[Any] = []
    for name in names:
        if isinstance(name, int):
            values.append(name)
            continue
        key = name.upper()
        key = key if key.startswith(prefix) else prefix + key
        try:
            values.append(enum.Value(key))
        except ValueError:
            known = ", ".join(
                n[len(prefix) :].lower()
                for n in (value.name for value in enum.DESCRIPTOR.values)
                if not n.endswith("UNSPECIFIED")
            )
            raise ValueError(f"unknown state {name!r}: use one of {known}") from None
    return values


STRAGGLER_ACTIONS = {"flag": job_pb2.STRAGGLER_ACTION_UNSPECIFIED, "restart": job_pb2.STRAGGLER_ACTION_RESTART}
"""--on-straggler's words and the StragglerAction each means: "flag" (the default) leaves it unset."""


def straggler_action(action: str | int) -> Any:
    """A StragglerAction from "flag" or "restart", an enum name, or its number; ValueError naming it otherwise."""
    if isinstance(action, int):
        return action
    word = action.lower().removeprefix("straggler_action_")
    if word in STRAGGLER_ACTIONS:
        return STRAGGLER_ACTIONS[word]
    if word == "unspecified":
        return job_pb2.STRAGGLER_ACTION_UNSPECIFIED
    raise ValueError(f"unknown on_straggler {action!r}: use 'flag' or 'restart'")


def timestamp(when: When) -> timestamp_pb2.Timestamp | None:
    """`when` as a Timestamp field's value; None stays unset."""
    if when is None:
        return None
    seconds = when.timestamp() if isinstance(when, datetime.datetime) else float(when)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def every_job(client, page_size: int = 0, **filters: Any) -> Iterator[Any]:
    """Every job list_jobs(**filters) matches, newest first, a page at a time (blocking Client)."""
    token = ""
    while True:
        jobs, token = client.list_jobs(page_size=page_size, page_token=token, **filters)
        yield from jobs
        if not token:
            return


async def every_job_async(client, page_size: int = 0, **filters: Any) -> AsyncIterator[Any]:
    """The same for AsyncClient."""
    token = ""
    while True:
        jobs, token = await client.list_jobs(page_size=page_size, page_token=token, **filters)
        for job in jobs:
            yield job
        if not token:
            return


def timestamp_seconds(request, field: str) -> float:
    """A google.protobuf.Timestamp field of a message in wall seconds; 0 when unset. Raises ValueError naming
    the field when it is outside what a Timestamp may hold (years 1 to 9999), as a hostile client may send."""
    if not request.HasField(field):
        return 0.0
    try:
        return getattr(request, field).ToNanoseconds() / 1e9
    except ValueError as error:
        raise ValueError(f"{field} is not a valid time: {error}") from None
