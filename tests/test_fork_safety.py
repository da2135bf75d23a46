"""The test process forks (pexpect's pty.fork for gpuctl run/attach) while it holds gRPC channels.

gRPC's own fork handler restarts its poller thread in the child; when the child then closes the
descriptors it does not keep before exec (as pexpect does), that poller finds its epoll descriptor
gone and aborts the child before exec: `gpuctl run` "ended" before it printed a word, now and then.
tests/conftest.py turns gRPC's fork support off for the test process, which never needs it: it
forks only to exec. (The daemons never fork: the agent starts ranks with posix_spawn.)
"""

from __future__ import annotations

import os
import time

CHILDREN = 10
"""Children forked at once in a round; with gRPC's fork handler on, a round loses some of them two times in three."""
ROUNDS = 3
"""Rounds of CHILDREN (so that a missing fix is seen with a chance of about 96 %)."""
LINGER_SECONDS = 1.0
"""How long each child lives without its descriptors: gRPC's poller aborts it when it next polls."""


def test_a_child_forked_beside_an_idle_grpc_channel_survives_closing_its_descriptors_before_exec(cluster):
    cluster.start_coordinator()
    cluster.client().cluster_status()  # the channel is connected, then idle, as the e2e tests leave theirs
    for round_number in range(ROUNDS):
        endings = _fork_children_that_close_their_descriptors()
        assert endings == [0] * CHILDREN, f"round {round_number}: children ended {endings} (negative: by that signal)"


def _fork_children_that_close_their_descriptors() -> list[int]:
    children = []
    for _ in range(CHILDREN):
        pid = os.fork()
        if pid == 0:  # what a fork-then-exec child does before its exec, with time for a poller to notice
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))
            time.sleep(LINGER_SECONDS)
            os._exit(0)
        children.append(pid)
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
