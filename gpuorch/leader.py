"""What a standby coordinator tells a caller about the leader: the trailing metadata keys of its UNAVAILABLE answers.

A standby (a coordinator waiting for the leader lease) answers every call but health with UNAVAILABLE, the
message naming the leader, and these keys in the trailing metadata; agents, the SDK and gpuctl read them
to go to the leader at once.
"""

from __future__ import annotations

LEADER_METADATA_KEY = "gpuorch-leader"
"""The leader's client address (host:port); absent when no coordinator leads."""
LEADER_AGENTS_METADATA_KEY = "gpuorch-leader-agents"
"""The leader's agent address (host:port), when agents connect to another port than clients (agent_listen)."""
