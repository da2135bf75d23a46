"""The pure parts of interactive work: the attach grace, what a session may open, the identity an exec runs as,
exit statuses, the authorisation rule."""

from __future__ import annotations

import pytest

from agent.identity import AS_AGENT, RankIdentity
from agent.interactive.beside import identity_beside, parse_environ, parse_status_ids
from agent.interactive.fds import ended_from_exit_file
from coordinator.api.auth import Action, Caller, authorize
from coordinator.api.interactive_service import open_problem
from coordinator.rules.attach_grace import attach_grace, expiry_reason, sweep
from gpuorch.v1 import interactive_pb2, job_pb2

Kind = interactive_pb2.SessionKind


def test_the_grace_clock_starts_unattached_stops_attached_and_expires():
    running = {"a": 10.0, "b": 10.0}
    since, expired = sweep(running, attached={"b"}, unattached_since={}, now=100.0)
    assert since == {"a": 100.0} and expired == []
    since, expired = sweep(running, attached={"b"}, unattached_since=since, now=110.0)
    assert since == {"a": 100.0} and expired == []  # exactly the grace: not yet
    since, expired = sweep(running, attached=set(), unattached_since=since, now=110.5)
    assert expired == ["a"] and since == {"b": 110.5}  # b's clock starts when its client leaves
    since, expired = sweep({"b": 10.0}, attached={"b"}, unattached_since=since, now=200.0)
    assert since == {} and expired == []  # attached again: the clock is reset
    since, _ = sweep({}, attached=set(), unattached_since={"gone": 1.0}, now=300.0)
    assert since == {}  # ended jobs are forgotten


def test_a_jobs_own_grace_wins_over_the_coordinators():
    assert attach_grace(0, 60.0) == 60.0
    assert attach_grace(5, 60.0) == 5.0
    assert "no client attached for 5s" in expiry_reason(5.0)


def job(state=job_pb2.JOB_STATE_RUNNING, interactive=True) -> job_pb2.Job:
    return job_pb2.Job(job_id="j-1", state=state, spec=job_pb2.JobSpec(interactive=interactive))


@pytest.mark.parametrize(
    "kind, open_session, the_job, problem",
    [
        (Kind.SESSION_KIND_ATTACH, {}, job(), None),
        (Kind.SESSION_KIND_ATTACH, {}, job(interactive=False), "not interactive"),
        (Kind.SESSION_KIND_ATTACH, {}, job(state=job_pb2.JOB_STATE_PENDING), "PENDING, not RUNNING"),
        (Kind.SESSION_KIND_EXEC, {"argv": ["env"]}, job(interactive=False), None),
        (Kind.SESSION_KIND_EXEC, {}, job(), "open.argv is empty"),
        (Kind.SESSION_KIND_EXEC, {"argv": ["a\0b"]}, job(), "NUL"),
        (Kind.SESSION_KIND_EXEC, {"argv": ["x" * 200_000]}, job(), "longer than"),
        (Kind.SESSION_KIND_PORT_FORWARD, {"port": 8888}, job(), None),
        (Kind.SESSION_KIND_PORT_FORWARD, {"port": 0}, job(), "open.port must be 1-65535"),
        (Kind.SESSION_KIND_PORT_FORWARD, {"port": 70000}, job(), "open.port must be 1-65535"),
    ],
)
def test_what_a_session_may_open(kind, open_session, the_job, problem):
    found = open_problem(kind, interactive_pb2.OpenSession(job_id="j-1", **open_session), the_job)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_only_the_owner_or_an_admin_may_interact():
    assert authorize(Caller("alice", "user"), Action.INTERACT, "alice") is None
    assert authorize(Caller("ops", "admin"), Action.INTERACT, "alice") is None
    denial = authorize(Caller("bob", "user"), Action.INTERACT, "alice")
    assert denial is not None and "bob may only attach to, exec in or forward ports to their own jobs" in denial


def test_exec_runs_as_the_rank_runs():
    status = "Name:\tpython\nUid:\t1001\t1001\t1001\t1001\nGid:\t1002\t1002\t1002\t1002\nGroups:\t1002 27 \n"
    uid, gid, groups = parse_status_ids(status)
    assert (uid, gid, groups) == (1001, 1002, (1002, 27))
    assert identity_beside(uid, gid, groups, agent_uid=0) == RankIdentity(switch=True, uid=1001, gid=1002, groups=(1002, 27))
    assert identity_beside(uid, gid, groups, agent_uid=1001) is AS_AGENT  # an agent that is not root runs as itself
    assert identity_beside(0, 0, (), agent_uid=0) is AS_AGENT  # a rank that runs as root (allow_root_ranks)
    assert parse_environ(b"A=1\0B=x=y\0\0junk\0") == {"A": "1", "B": "x=y"}


def test_exit_files_become_session_ends():
    assert ended_from_exit_file({"exit_code": "3"}, "").exit_code == 3
    killed = ended_from_exit_file({"signal": "9"}, "")
    assert killed.signal == 9 and killed.process_exited
    failed = ended_from_exit_file({"failed_to_start": "cannot execute 'nope'"}, "")
    assert failed.exit_code == 127 and "nope" in failed.message
    unknown = ended_from_exit_file(None, "unknown")
    assert not unknown.process_exited and unknown.message == "unknown"
