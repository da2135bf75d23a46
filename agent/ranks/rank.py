"""One rank the supervisor knows of: its record in the state dir and where it stands now."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.ranks import results
from agent.ranks.lifecycle import EndFacts, RankState, exit_meaning
from agent.ranks.state_dir import RankRecord
from gpuorch.v1 import agent_pb2

RankKey = tuple[str, int, int]
"""(job id, attempt, rank)."""


@dataclass
class Rank:
    """A rank this supervisor knows of: starting, running, or ended and not yet forgotten."""

    record: RankRecord
    record_path: Path
    state: RankState = RankState.STARTING
    started: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the start was reported (RUNNING or FAILED_TO_START): exits are reported after it."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    final_status: agent_pb2.TaskStatus | None = None
    ended_at: float = 0.0
    """Wall-clock time the rank ended, for the unacknowledged-exit expiry."""
    pidfd: int = -1
    shim_end: str = ""
    """How the shim itself ended, when it was our child, e.g. "exit status 1"."""
    watching_rank_only: bool = False
    """The shim is gone but the rank lives on: watch the rank itself; its exit status is lost."""
    kill_reason: str = ""
    forget_once_ended: bool = False
    """Its attempt was forgotten while it ran: it leaves as soon as its end is reported."""

    @property
    def key(self) -> RankKey:
        return (self.record.job_id, self.record.attempt, self.record.rank)

    def status(self, state: agent_pb2.TaskState, **fields: Any) -> agent_pb2.TaskStatus:
        return agent_pb2.TaskStatus(
            job_id=self.record.job_id, attempt=self.record.attempt, rank=self.record.rank, state=state, **fields
        )

    def running_status(self) -> agent_pb2.TaskStatus:
        """RUNNING, or, while its shim is still starting it, RUNNING with `starting` set (known, not started)."""
        starting = self.state is RankState.STARTING
        return self.status(
            agent_pb2.TASK_STATE_RUNNING, pid=self.record.rank_pid, working_dir=self.record.working_dir, starting=starting
        )

    @property
    def fields(self) -> dict[str, Any]:
        """The rank's identity, for structured logs."""
        return {"job": self.record.job_id, "attempt": self.record.attempt, "rank": self.record.rank}

    def end(self, exit_status: dict[str, str] | None, ended_at: float) -> agent_pb2.TaskStatus:
        """Moves the rank to ENDED with the final status its exit means (lifecycle.exit_meaning)."""
        record = self.record
        facts = EndFacts(
            exit_status,
            record.rank_pid,
            record.shim_pid,
            self.shim_end,
            self.watching_rank_only,
            self.kill_reason,
            record.log_path,
        )
        meaning = exit_meaning(facts)
        self.final_status = self.status(
            meaning.state,
            exit_code=meaning.exit_code,
            signal=meaning.signal,
            message=meaning.message,
            pid=meaning.pid,
            time_limited=record.time_limited,
            result_json=results.read_result(Path(record.pid_path)) if record.pid_path else "",
        )
        self.ended_at = ended_at
        self.state = RankState.ENDED
        self.started.set()
        self.ended.set()
        return self.final_status
