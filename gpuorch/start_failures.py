"""What the agent says of a rank it could not start, as the coordinator reads it (TaskStatus.message of a
FAILED_TO_START report): one spelling for both daemons."""

from __future__ import annotations

AGENT_COULD_NOT_LAUNCH = "the agent could not launch it"
"""How the message of each rank of a launch that raised in the agent itself begins (agent/router.py): the agent's
fault, not the job's, so the coordinator restarts the attempt (coordinator/rules/recovery.py)."""
