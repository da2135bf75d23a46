"""SIGUSR1 makes a running coordinator log every thread's and task's stack, and it goes on serving (gpuorch/stacks.py)."""

from __future__ import annotations

from tests.harness import LocalCluster, wait_for


def test_sigusr1_logs_every_threads_and_tasks_stack_and_the_coordinator_goes_on(tmp_path):
    cluster = LocalCluster(tmp_path)
    try:
        coordinator = cluster.start_coordinator()
        coordinator.log_stacks()

        def logged() -> str:
            text = coordinator.output()
            return text if "task stack (SIGUSR1)" in text else ""

        log = wait_for(logged, 10, 0.1, "the stacks")
        assert "Current thread" in log or "Thread 0x" in log, "faulthandler's dump of the threads"
        assert "liveness_loop" in log, "the liveness task's stack names where it awaits"
        assert cluster.client().cluster_status().nodes_total == 0, "it still serves"
        assert coordinator.process.poll() is None
    finally:
        cluster.stop()
