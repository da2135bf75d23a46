"""What a valid agent registration is (pure): node ids, heartbeat intervals, devices."""

from __future__ import annotations

import re

from gpuorch.pools import pool_name_problem
from gpuorch.v1 import agent_pb2

NODE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,252}$")
MAX_DEVICES_PER_NODE = 64
MIN_HEARTBEAT_INTERVAL = 0.05
MAX_HEARTBEAT_INTERVAL = 300.0


class InvalidMessage(ValueError):
    """An agent sent something the protocol does not allow; the text says what."""


def validate_register(register: agent_pb2.Register) -> None:
    """Raises InvalidMessage naming the first thing wrong with a registration."""
    if not register.node_id:
        raise InvalidMessage("register.node_id is empty")
    if not NODE_ID_PATTERN.match(register.node_id):
        raise InvalidMessage(
            f"register.node_id {register.node_id[:80]!r} is not a valid node id "
            "(letters, digits, '.', '_', ':', '-'; at most 253 characters)"
        )
    interval = register.heartbeat_interval_seconds
    if interval != 0 and not (MIN_HEARTBEAT_INTERVAL <= interval <= MAX_HEARTBEAT_INTERVAL):
        raise InvalidMessage(
            f"register.heartbeat_interval_seconds {interval!r} is outside "
            f"[{MIN_HEARTBEAT_INTERVAL}, {MAX_HEARTBEAT_INTERVAL}] (or 0 for the coordinator's)"
        )
    problem = pool_name_problem(register.pool)
    if problem:
        raise InvalidMessage(f"register.pool: {problem}")
    if len(register.devices) > MAX_DEVICES_PER_NODE:
        raise InvalidMessage(f"register.devices has {len(register.devices)} devices; at most {MAX_DEVICES_PER_NODE}")
    seen: set[str] = set()
    for position, device in enumerate(register.devices):
        if not device.uuid:
            raise InvalidMessage(f"register.devices[{position}].uuid is empty")
        if device.uuid in seen:
            raise InvalidMessage(f"register.devices[{position}].uuid {device.uuid!r} appears twice")
        seen.add(device.uuid)
