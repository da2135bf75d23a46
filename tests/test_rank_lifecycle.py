"""agent/ranks/lifecycle.py: what a launch, an exit and a stale attempt mean, without processes."""

from __future__ import annotations

import signal

import pytest

from agent.ranks.lifecycle import (
    UNACKNOWLEDGED_EXIT_TTL,
    EndFacts,
    LaunchAction,
    RankState,
    exit_expired,
    exit_meaning,
    forget_applies,
    launch_action,
    sigkill_reason,
    stale_attempt,
    stop_applies,
)
from gpuorch.clock import FakeClock
from gpuorch.v1 import agent_pb2

EXITED = agent_pb2.TASK_STATE_EXITED
FAILED_TO_START = agent_pb2.TASK_STATE_FAILED_TO_START


def facts(exit_status: dict[str, str] | None, **overrides) -> EndFacts:
    fields = {"rank_pid": 200, "shim_pid": 100, "log_path": "/state/jobs/j/attempt-1/rank-0.log", **overrides}
    return EndFacts(exit_status=exit_status, **fields)


def test_an_exit_code_is_reported_as_it_was() -> None:
    meaning = exit_meaning(facts({"exit_code": "3", "rank_pid": "200"}))
    assert (meaning.state, meaning.exit_code, meaning.signal, meaning.pid) == (EXITED, 3, 0, 200)


def test_a_signal_is_named_unless_the_agent_said_why_it_sent_it() -> None:
    killed = exit_meaning(facts({"signal": str(int(signal.SIGSEGV))}))
    assert (killed.state, killed.signal, killed.message) == (EXITED, signal.SIGSEGV, "killed by SIGSEGV")
    stopped = exit_meaning(facts({"signal": str(int(signal.SIGKILL))}, kill_reason=sigkill_reason(2.5)))
    assert stopped.message == "killed with SIGKILL after a 2.5s grace period"


def test_a_failed_start_recorded_by_the_shim_is_a_failed_start() -> None:
    meaning = exit_meaning(facts({"failed_to_start": "exec: no such file"}))
    assert (meaning.state, meaning.message) == (FAILED_TO_START, "exec: no such file")


def test_a_shim_that_died_before_starting_the_rank_points_at_the_log() -> None:
    meaning = exit_meaning(facts(None, rank_pid=0, shim_end="killed by signal 9"))
    assert meaning.state == FAILED_TO_START
    assert meaning.message == (
        "the rank's shim ended (killed by signal 9) before starting it; see /state/jobs/j/attempt-1/rank-0.log"
    )


@pytest.mark.parametrize(
    ("watching_rank_only", "who"), [(False, "the shim (pid 100)"), (True, "the rank")], ids=["shim lost", "rank watched"]
)
def test_a_lost_exit_status_counts_as_a_kill_and_says_whose_it_was(watching_rank_only: bool, who: str) -> None:
    meaning = exit_meaning(facts(None, watching_rank_only=watching_rank_only, kill_reason="stopped with SIGTERM"))
    assert (meaning.state, meaning.signal, meaning.pid) == (EXITED, signal.SIGKILL, 200)
    assert meaning.message == f"exit status lost: {who} ended without recording it; stopped with SIGTERM"


def test_only_an_attempt_older_than_the_highest_seen_is_stale() -> None:
    assert stale_attempt("j", 2, highest_seen=3) == "attempt 2 of j is older than attempt 3 already seen"
    assert stale_attempt("j", 3, highest_seen=3) == ""
    assert stale_attempt("j", 4, highest_seen=3) == ""
    assert stale_attempt("j", 1, highest_seen=0) == ""


@pytest.mark.parametrize(
    ("known", "launched_before", "action"),
    [
        (None, False, LaunchAction.START),
        (None, True, LaunchAction.IGNORE),  # started once and forgotten: never twice
        (RankState.STARTING, True, LaunchAction.WAIT_FOR_START),
        (RankState.RUNNING, True, LaunchAction.REPORT_AGAIN),
        (RankState.ENDED, True, LaunchAction.REPORT_AGAIN),
    ],
)
def test_a_resent_launch_never_starts_a_rank_twice(known: RankState | None, launched_before: bool, action: LaunchAction) -> None:
    assert launch_action(known, launched_before) is action


def test_a_stop_reaches_older_attempts_a_forget_only_its_own() -> None:
    assert [stop_applies("j", 2, "j", attempt) for attempt in (1, 2, 3)] == [True, True, False]
    assert [forget_applies("j", 2, "j", attempt) for attempt in (1, 2, 3)] == [False, True, False]
    assert stop_applies("j", 0, "j", 7) and forget_applies("j", 0, "j", 7)  # 0: every attempt
    assert not stop_applies("j", 0, "other", 1) and not forget_applies("j", 0, "other", 1)


def test_an_unforgotten_end_expires_after_its_ttl() -> None:
    clock = FakeClock()
    ended_at = clock.wall()
    clock.advance(UNACKNOWLEDGED_EXIT_TTL)
    assert not exit_expired(ended_at, clock.wall())
    clock.advance(1)
    assert exit_expired(ended_at, clock.wall())
