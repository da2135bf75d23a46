"""A randomized fault test of a real local cluster: faults and submissions from a seeded plan, then invariants.

A real coordinator and four agents with two simulated GPUs each run small ranks
(tests/workloads/chaos_rank.py) while a plan drawn from `random.Random(seed)` submits jobs (each
with a client request id, some sent again as duplicates), cancels some, and injects faults:
SIGKILL of a rank, SIGKILL of an agent (restarted later), SIGSTOP then SIGCONT of an agent (often
past its DOWN deadline), SIGKILL and restart of the coordinator, GPU faults through the agent's
simulated-faults.json, drains and resumes. Then the faults stop, everything is healed, and the
test checks what must hold whatever the outcome of each job:

- every acknowledged job exists exactly once (a resubmitted request id names the same job) and
  reaches a final state;
- no GPU is held by two live attempts at once and no two attempts of one job are alive at once,
  judged from the ranks' own start and end records and from pidfds the test holds on every rank;
- a rank the coordinator says died was not alive after it said so;
- no daemon exits unless the test stopped it, and no daemon log shows a traceback;
- nothing is left running: no rank of a final job, no process of the run once the cluster stops.

The plan is deterministic given the seed (the timing of a real cluster is not). Settings:

    GPUORCH_CHAOS_SECONDS=S      length of the fault phase (default 25)
    GPUORCH_CHAOS_SEED=N         replay a seed; GPUORCH_CHAOS_SEED=random draws a new one (printed)

Deselect with `-m "not chaos"`.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.protobuf import json_format

from gpuorch.client import build_job_spec
from gpuorch.errors import GpuorchError
from gpuorch.v1 import job_pb2
from tests.harness import REPO, SUMMARY_LINES, Daemon, LocalCluster, wait_for

pytestmark = pytest.mark.chaos

CHAOS_RANK = str(REPO / "tests" / "workloads" / "chaos_rank.py")
FAULT_SECONDS = float(os.environ.get("GPUORCH_CHAOS_SECONDS", "25"))
_SEED_SETTING = os.environ.get("GPUORCH_CHAOS_SEED", "1")
SEED = random.SystemRandom().randrange(1 << 32) if _SEED_SETTING == "random" else int(_SEED_SETTING)
SETTLE_SECONDS = 60.0
"""After the faults stop, how long every acknowledged job has to reach a final state."""

NODES = ("n1", "n2", "n3", "n4")
GPUS_PER_NODE = 2
HEARTBEAT_INTERVAL = 0.25
NODE_GRACE_PERIOD = 1.5
STOP_GRACE_PERIOD = 1.5
COORDINATOR_ARGS = (
    "--heartbeat-interval", str(HEARTBEAT_INTERVAL),
    "--node-grace-period", str(NODE_GRACE_PERIOD),
    "--missed-heartbeats", "3",
    "--stop-grace-period", str(STOP_GRACE_PERIOD),
    "--restart-backoff-base", "0.2",
    "--device-recovery-seconds", "1",
)  # fmt: skip
AGENT_ARGS = ("--heartbeat-interval", str(HEARTBEAT_INTERVAL))
FINAL = (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED)
CLOCK_SLACK = 0.002
"""Seconds two records may seem to overlap by clock granularity alone (CLOCK_BOOTTIME is in ns; wall time in us)."""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
"""Units of a process's start time in /proc/PID/stat (CLOCK_BOOTTIME at its fork)."""
SIGNS_OF_A_CRASH = ("Traceback", "background loop crashed", "error handling agent message")
GPU_FAULTS = ({"xid": 79}, {"lost": True}, {"temperature": 97.0}, {"ecc_uncorrected": 2})
REREGISTERED_WITHOUT = "its agent re-registered without it"
RANK_DEATH = re.compile(r"rank (\d+) on node (\S+) (?:was killed by signal|exited with code)")


# -- the plan: everything the test will do, drawn from the seed before the cluster starts --------------------


@dataclass(frozen=True)
class Action:
    at: float
    """Seconds after the fault phase starts."""
    kind: str
    node: str = ""
    request: str = ""
    pick: float = 0.0
    """Which live rank a kill_rank hits: the fraction of the way along the sorted live ranks."""
    gpu_index: int = 0
    gpu_fault: dict = field(default_factory=dict)


@dataclass(frozen=True)
class JobPlan:
    request: str
    gpus: int
    min_gpus: int
    max_restarts: int
    seconds: float
    fail_attempts: str
    term_linger: float


def make_plan(seed: int, seconds: float, run: str) -> tuple[list[Action], dict[str, JobPlan]]:
    rng = random.Random(seed)
    actions: list[Action] = []
    jobs: dict[str, JobPlan] = {}
    t = 0.0
    while (t := t + rng.expovariate(1.3)) < seconds:
        request = f"{run}-{len(jobs):03d}"
        gpus = rng.choice((1, 1, 2, 2, 2, 4))
        elastic = gpus == 4 and rng.random() < 0.4
        jobs[request] = JobPlan(
            request=request,
            gpus=gpus,
            min_gpus=2 if elastic else 0,
            max_restarts=rng.choice((0, 1, 2, 3)),
            seconds=round(rng.uniform(0.3, 3.0), 2),
            fail_attempts=rng.choice(("", "", "", "1", "1,2")),
            term_linger=rng.choice((0.0, 0.0, round(rng.uniform(0.2, 1.2), 2), 3.0)),
        )
        actions.append(Action(t, "submit", request=request))
        if rng.random() < 0.25:
            actions.append(Action(t + rng.uniform(0.05, 4.0), "duplicate", request=request))
        if rng.random() < 0.12:
            actions.append(Action(t + rng.uniform(0.2, 4.0), "cancel", request=request))
    node_busy_until = dict.fromkeys(NODES, 0.0)
    drained_until = dict.fromkeys(NODES, 0.0)
    faulted_until: dict[tuple[str, int], float] = {}
    coordinator_busy_until = 0.0
    fault_kinds = ("kill_rank", "kill_agent", "stop_agent", "kill_coordinator", "gpu_fault", "drain")
    first_of_each = rng.sample(fault_kinds, len(fault_kinds))  # a short run still has every kind of fault
    t = 1.0
    while (t := t + rng.expovariate(0.8)) < seconds:
        kind = first_of_each.pop() if first_of_each else rng.choices(fault_kinds, weights=(4, 1.5, 1.5, 1, 1.5, 1))[0]
        pause = round(rng.uniform(0.3, 3.0), 2)
        if kind == "kill_rank":
            actions.append(Action(t, "kill_rank", pick=rng.random()))
        elif kind in ("kill_agent", "stop_agent"):
            if free := [node for node in NODES if node_busy_until[node] < t]:
                node = rng.choice(free)
                recovery = "restart_agent" if kind == "kill_agent" else "cont_agent"
                actions += [Action(t, kind, node=node), Action(t + pause, recovery, node=node)]
                node_busy_until[node] = t + pause + 1.0
        elif kind == "kill_coordinator":
            if coordinator_busy_until < t:
                actions += [Action(t, "kill_coordinator"), Action(t + pause / 3, "restart_coordinator")]
                coordinator_busy_until = t + pause / 3 + 3.0
        elif kind == "gpu_fault":
            if healthy := [
                (node, index) for node in NODES for index in range(GPUS_PER_NODE) if faulted_until.get((node, index), 0.0) < t
            ]:
                node, index = rng.choice(healthy)
                actions += [
                    Action(t, "gpu_fault", node=node, gpu_index=index, gpu_fault=rng.choice(GPU_FAULTS)),
                    Action(t + pause + 1.0, "gpu_clear", node=node, gpu_index=index),
                ]
                faulted_until[(node, index)] = t + pause + 1.5
        elif kind == "drain" and (free := [node for node in NODES if drained_until[node] < t]):
            node = rng.choice(free)
            actions += [Action(t, "drain", node=node), Action(t + pause + 1.0, "resume", node=node)]
            drained_until[node] = t + pause + 1.5
    actions.sort(key=lambda action: action.at)
    return actions, jobs


def job_argv(plan: JobPlan, record: Path, run: str) -> list[str]:
    argv = [sys.executable, "-S", CHAOS_RANK, "--record", str(record), "--run", run, "--request", plan.request]
    argv += ["--seconds", str(plan.seconds), "--term-linger", str(plan.term_linger)]
    return argv + (["--fail-attempts", plan.fail_attempts] if plan.fail_attempts else [])


# -- watching the ranks: their own records, and a pidfd on each -------------------------------------------------


@dataclass
class RankLife:
    """One rank process, from its start line. `start_boot` is a time by which it surely existed (the end of
    the clock tick in which the kernel forked it, or its start line if earlier); `alive_until` a time
    at which it was surely still alive. Times are CLOCK_BOOTTIME (`_boot`) and wall clock (`_wall`)."""

    job: str
    attempt: int
    rank: int
    node: str
    gpu: str
    pid: int
    request: str
    start_boot: float
    start_wall: float
    alive_until_boot: float
    alive_until_wall: float
    ended: bool = False
    end_code: int | None = None
    """The exit code its end line gave."""
    end_how: str = ""
    """"exit"/"sigterm" (its own end line) or "watched" (the pidfd said it was gone)."""

    @property
    def who(self) -> str:
        return f"job {self.job} attempt {self.attempt} rank {self.rank} (node {self.node}, GPU {self.gpu}, pid {self.pid})"


class RankWatcher(threading.Thread):
    """Tails the shared record file and holds a pidfd on every rank it names.

    A record's times are inside the rank's real life (it was forked before the end of its start
    tick and ends after its end line), and `alive_until` only moves to a time at which a non-blocking poll
    found its pidfd not yet readable: every interval here is within the rank's true lifetime, so
    an overlap of two of them is a real one.
    """

    def __init__(self, record: Path) -> None:
        super().__init__(name="rank-watcher", daemon=True)
        self.record = record
        self.lives: dict[tuple[str, int, int, int], RankLife] = {}
        self.pidfds: dict[int, RankLife] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._offset = 0
        self._partial = b""

    def run(self) -> None:
        poller = select.poll()
        while not self.stopping.is_set():
            self._read_records(poller)
            now_boot, now_wall = time.clock_gettime(time.CLOCK_BOOTTIME), time.time()
            ready = {fd for fd, _ in poller.poll(0)}
            with self.lock:
                for fd, life in list(self.pidfds.items()):
                    if fd in ready:
                        poller.unregister(fd)
                        os.close(fd)
                        del self.pidfds[fd]
                        life.ended = True
                        life.end_how = life.end_how or "watched"
                    else:
                        life.alive_until_boot, life.alive_until_wall = (
                            max(life.alive_until_boot, now_boot),
                            max(life.alive_until_wall, now_wall),
                        )
            poller.poll(15)  # a nap that a death cuts short
        self._read_records(poller)

    def _read_records(self, poller: select.poll) -> None:
        try:
            with open(self.record, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._on_line(json.loads(line), poller)

    def _on_line(self, line: dict, poller: select.poll) -> None:
        key = (line["job"], line["attempt"], line["rank"], line["pid"])
        with self.lock:
            if line["event"] == "start":
                life = RankLife(
                    line["job"], line["attempt"], line["rank"], line["node"], line["gpu"], line["pid"], line["request"],
                    min(line["boot"], (line["proc_start"] + 1) / CLOCK_TICKS), line["wall"], line["boot"], line["wall"],
                )  # fmt: skip
                self.lives[key] = life
                try:
                    fd = os.pidfd_open(life.pid)
                except ProcessLookupError:
                    return
                if _process_start_time(life.pid) != line["proc_start"]:
                    os.close(fd)  # the pid was already reused: this rank is gone
                    return
                self.pidfds[fd] = life
                poller.register(fd, select.POLLIN)
            elif (ended := self.lives.get(key)) is not None:
                ended.alive_until_boot = max(ended.alive_until_boot, line["boot"])
                ended.alive_until_wall = max(ended.alive_until_wall, line["wall"])
                ended.end_how, ended.end_code = line["how"], line["code"]

    def live(self) -> list[tuple[int, RankLife]]:
        with self.lock:
            return sorted(self.pidfds.items(), key=lambda item: (item[1].job, item[1].attempt, item[1].rank))

    def kill(self, fd: int) -> bool:
        """SIGKILL through the pidfd: never hits a process that reused the pid."""
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            return True
        except (ProcessLookupError, OSError):
            return False

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        with self.lock:
            for fd in self.pidfds:
                os.close(fd)
            self.pidfds.clear()


def _process_start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def processes_of_run(run: str) -> dict[int, str]:
    """pid -> command line of every process whose argv carries the run's token (ranks and their shims)."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if run.encode() in argv:
            found[int(entry.name)] = " ".join(part.decode(errors="replace") for part in argv)
    return found


def kill_processes_of_run(run: str) -> None:
    for pid in processes_of_run(run):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- the cluster, with every daemon it ever started ---------------------------------------------------------------


class ChaosCluster(LocalCluster):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.every_daemon: list[Daemon] = []
        self.stopped_by_test: set[int] = set()
        """pids the test killed or is keeping stopped: their exit is no surprise."""

    def start_coordinator(self, *extra: str, wait: bool = True) -> Daemon:
        daemon = super().start_coordinator(*COORDINATOR_ARGS, *extra, wait=wait)
        self.every_daemon.append(daemon)
        return daemon

    def add_agent(self, node_id: str, gpus: int = GPUS_PER_NODE, *extra: str, **options) -> Daemon:
        daemon = super().add_agent(node_id, gpus, *AGENT_ARGS, *extra, **options)
        self.every_daemon.append(daemon)
        return daemon

    def the_coordinator(self) -> Daemon:
        assert self.coordinator is not None, "the coordinator was started"
        return self.coordinator

    def kill_daemon(self, daemon: Daemon) -> None:
        self.stopped_by_test.add(daemon.pid)
        daemon.signal(signal.SIGCONT)
        daemon.kill()

    def stop(self) -> None:
        super().stop()
        for daemon in self.every_daemon:  # killed ones too: close their logs, reap them
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGCONT)
                daemon.process.kill()
                daemon.process.wait(10)
            if not daemon.log.closed:
                daemon.log.close()


@pytest.fixture
def run_token():
    """Marks every rank of the run (in its argv); whatever happened, nothing of the run outlives the test."""
    token = f"chaos{SEED:x}t{os.getpid()}"
    yield token
    kill_processes_of_run(token)


@pytest.fixture
def cluster(tmp_path, run_token):
    """Named like conftest's fixture so that its report hook adds the daemons' log tails to a failure;
    stopped before `run_token` kills what is left of the run."""
    local = ChaosCluster(tmp_path)
    yield local
    local.stop()


# -- carrying out the plan --------------------------------------------------------------------------------------


class Chaos:
    def __init__(self, cluster: ChaosCluster, watcher: RankWatcher, plans: dict[str, JobPlan], record: Path, run: str) -> None:
        self.cluster = cluster
        self.watcher = watcher
        self.plans = plans
        self.record = record
        self.run = run
        self.acknowledged: dict[str, str] = {}
        """request id -> the job id the coordinator answered."""
        self.violations: list[str] = []
        self.done: list[str] = []
        """What the test did, with times: the story to read next to the daemon logs."""
        self.stopped_agents: set[str] = set()
        self.killed_agents: set[str] = set()
        self.coordinator_down = False
        self.gpu_faults: dict[str, dict[int, dict]] = {node: {} for node in NODES}
        self.drained: set[str] = set()
        self.cancelled: set[str] = set()
        """Jobs the test asked to cancel (whether or not the answer came back)."""
        self.submitted: list[str] = []
        """Request ids whose submission the plan has made (acknowledged or not yet)."""
        self.t0 = time.monotonic()

    def note(self, text: str) -> None:
        self.done.append(f"{time.monotonic() - self.t0:7.2f}s {time.strftime('%H:%M:%S')} {text}")

    def client(self):
        return self.cluster.client()

    def submit(self, request: str) -> str | None:
        plan = self.plans[request]
        spec = build_job_spec(
            job_argv(plan, self.record, self.run),
            gpus=plan.gpus,
            min_gpus=plan.min_gpus,
            max_restarts=plan.max_restarts,
            name=f"chaos-{request}",
            backend="gloo",
        )
        try:
            job_id = self.client().submit_job(spec, client_request_id=request)
        except GpuorchError as error:
            self.note(f"submit {request}: {type(error).__name__} (retried later)")
            return None
        known = self.acknowledged.setdefault(request, job_id)
        if known != job_id:
            self.violations.append(f"exactly once: request {request} was answered with job {known}, then with job {job_id}")
        self.note(f"submit {request} -> {job_id}")
        return job_id

    def act(self, action: Action) -> None:
        cluster, client = self.cluster, self.client()
        if action.kind in ("submit", "duplicate"):
            self.submit(action.request)
        elif action.kind == "cancel":
            job_id = self.acknowledged.get(action.request)
            if job_id and not self.coordinator_down:
                self.cancelled.add(job_id)
                try:
                    self.note(f"cancel {job_id}: {job_pb2.JobState.Name(client.cancel_job(job_id).state)}")
                except GpuorchError as error:
                    self.note(f"cancel {job_id}: {error}")
        elif action.kind == "kill_rank":
            live = self.watcher.live()
            if live:
                fd, life = live[min(int(action.pick * len(live)), len(live) - 1)]
                if self.watcher.kill(fd):
                    self.note(f"SIGKILL {life.who}")
        elif action.kind == "kill_agent":
            self.note(f"SIGKILL agent {action.node} (pid {cluster.agents[action.node].pid})")
            cluster.kill_daemon(cluster.agents[action.node])
            self.killed_agents.add(action.node)
        elif action.kind == "restart_agent":
            self.killed_agents.discard(action.node)
            self.note(f"restart agent {action.node} (pid {cluster.add_agent(action.node).pid})")
        elif action.kind == "stop_agent":
            agent = cluster.agents[action.node]
            self.cluster.stopped_by_test.add(agent.pid)
            agent.signal(signal.SIGSTOP)
            self.stopped_agents.add(action.node)
            self.note(f"SIGSTOP agent {action.node} (pid {agent.pid})")
        elif action.kind == "cont_agent":
            agent = cluster.agents[action.node]
            agent.signal(signal.SIGCONT)
            self.cluster.stopped_by_test.discard(agent.pid)
            self.stopped_agents.discard(action.node)
            self.note(f"SIGCONT agent {action.node} (pid {agent.pid})")
        elif action.kind == "kill_coordinator":
            self.note(f"SIGKILL coordinator (pid {cluster.the_coordinator().pid})")
            cluster.kill_daemon(cluster.the_coordinator())
            self.coordinator_down = True
        elif action.kind == "restart_coordinator":
            coordinator = cluster.start_coordinator()
            self.coordinator_down = False
            self.note(f"coordinator restarted (pid {coordinator.pid})")
        elif action.kind in ("gpu_fault", "gpu_clear"):
            faults = self.gpu_faults[action.node]
            if action.kind == "gpu_fault":
                faults[action.gpu_index] = action.gpu_fault
            else:
                faults.pop(action.gpu_index, None)
            self.write_faults(action.node)
            self.note(f"GPU faults of {action.node}: {faults}")
        elif action.kind in ("drain", "resume") and not self.coordinator_down:
            try:
                if action.kind == "drain":
                    client.drain_node(action.node, "chaos")
                    self.drained.add(action.node)
                else:
                    client.resume_node(action.node)
                    self.drained.discard(action.node)
                self.note(f"{action.kind} {action.node}")
            except GpuorchError as error:
                self.note(f"{action.kind} {action.node}: {error}")

    def write_faults(self, node: str) -> None:
        path = self.cluster.faults_file(node)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({str(index): fault for index, fault in self.gpu_faults[node].items()}))
        temporary.replace(path)

    def check_daemons(self) -> None:
        """A daemon that exited without the test killing it is a violation; it is started again so the run goes on."""
        cluster = self.cluster
        daemons = [("coordinator", cluster.the_coordinator())] + [
            (f"agent {node}", agent) for node, agent in cluster.agents.items()
        ]
        for name, daemon in daemons:
            code = daemon.process.poll() if daemon.process is not None else None
            if code is None or daemon.pid in cluster.stopped_by_test:
                continue
            tail = "\n    ".join(daemon.output().splitlines()[-6:])
            self.violations.append(
                f"daemons stay up: {name} (pid {daemon.pid}) exited with {code} on its own; its log ends:\n    {tail}"
            )
            cluster.stopped_by_test.add(daemon.pid)
            self.note(f"{name} (pid {daemon.pid}) exited with {code}; starting it again")
            if name == "coordinator":
                cluster.start_coordinator()
            else:
                self.stopped_agents.discard(daemon.name)
                cluster.add_agent(daemon.name)

    def carry_out(self, actions: list[Action]) -> None:
        retry_at = 0.0
        for action in actions:
            while (wait := self.t0 + action.at - time.monotonic()) > 0:
                time.sleep(min(wait, 0.1))
                self.check_daemons()
            self.act(action)
            if action.kind == "submit":
                self.submitted.append(action.request)
            if time.monotonic() > retry_at and not self.coordinator_down:
                self.submit_unacknowledged()
                retry_at = time.monotonic() + 0.5

    def submit_unacknowledged(self) -> bool:
        """Sends again, with the same request id, every submission that got no answer; True when none is left."""
        for request in self.submitted:
            if request not in self.acknowledged:
                self.submit(request)
        return all(request in self.acknowledged for request in self.submitted)

    def heal(self) -> None:
        """The faults stop: every agent runs, the coordinator serves, no GPU fault, no drain; every request acknowledged."""
        cluster = self.cluster
        for node in sorted(self.stopped_agents):
            cluster.agents[node].signal(signal.SIGCONT)
            cluster.stopped_by_test.discard(cluster.agents[node].pid)
            self.note(f"heal: SIGCONT agent {node}")
        self.stopped_agents.clear()
        for node in sorted(self.killed_agents):
            cluster.add_agent(node)
            self.note(f"heal: restart agent {node}")
        self.killed_agents.clear()
        if self.coordinator_down:
            cluster.start_coordinator()
            self.coordinator_down = False
        for node in NODES:
            self.gpu_faults[node].clear()
            self.write_faults(node)
        self.check_daemons()

        def resumed():
            for node in sorted(self.drained):
                self.client().resume_node(node)
                self.drained.discard(node)
            return True

        wait_for(resumed, timeout=15, what="drained nodes to resume")
        wait_for(self.submit_unacknowledged, timeout=20, what="every submission acknowledged")
        self.note("healed")

    def wait_until_final(self) -> dict[str, job_pb2.Job]:
        jobs: dict[str, job_pb2.Job] = {}
        deadline = time.monotonic() + SETTLE_SECONDS
        open_ids = set(self.acknowledged.values())
        while open_ids and time.monotonic() < deadline:
            self.check_daemons()
            for job_id in sorted(open_ids):
                try:
                    jobs[job_id] = self.client().get_job(job_id)
                except GpuorchError:
                    continue
                if jobs[job_id].state in FINAL:
                    open_ids.discard(job_id)
            time.sleep(0.3)
        for job_id in sorted(open_ids):
            job = jobs.get(job_id)
            state = job_pb2.JobState.Name(job.state) if job else "unknown"
            self.violations.append(
                f"every job ends: job {job_id} still {state} {SETTLE_SECONDS:.0f}s after the faults stopped "
                f"({job.reason if job else ''})"
            )
        self.note("every job final" if not open_ids else f"{len(open_ids)} jobs not final")
        return jobs


# -- the invariants, over plain data ----------------------------------------------------------------------------


def check_exactly_once(listed: list[job_pb2.Job], acknowledged: dict[str, str], run: str) -> list[str]:
    problems = []
    by_request: dict[str, list[str]] = {}
    for job in listed:
        if job.spec.name.startswith(f"chaos-{run}-"):
            by_request.setdefault(job.spec.name.removeprefix("chaos-"), []).append(job.job_id)
    for request, job_ids in sorted(by_request.items()):
        if len(job_ids) > 1:
            problems.append(f"exactly once: request {request} made {len(job_ids)} jobs: {sorted(job_ids)}")
        if request not in acknowledged:
            problems.append(f"exactly once: jobs {job_ids} of request {request}, which was never acknowledged")
    for request, job_id in sorted(acknowledged.items()):
        if job_id not in by_request.get(request, []):
            problems.append(f"exactly once: acknowledged job {job_id} (request {request}) is missing from ListJobs")
    return problems


def check_no_gpu_held_twice(lives: list[RankLife]) -> list[str]:
    problems = []
    by_gpu: dict[tuple[str, str], list[RankLife]] = {}
    for life in lives:
        by_gpu.setdefault((life.node, life.gpu), []).append(life)
    for (node, gpu), on_gpu in sorted(by_gpu.items()):
        on_gpu.sort(key=lambda life: life.start_boot)
        for index, earlier in enumerate(on_gpu):
            for later in on_gpu[index + 1 :]:
                if (later.job, later.attempt) == (earlier.job, earlier.attempt):
                    continue
                overlap = _overlap(earlier, later)
                if overlap > CLOCK_SLACK:
                    problems.append(
                        f"no GPU held twice: GPU {gpu} on {node} ran {earlier.who} and {later.who} together for at least "
                        f"{overlap:.3f}s (the second started at {_clock(later.start_wall)}; the first was alive at "
                        f"{_clock(earlier.alive_until_wall)}, ended by {earlier.end_how or 'still running'})"
                    )
    return problems


def check_one_attempt_at_a_time(
    lives: list[RankLife], jobs: dict[str, job_pb2.Job], down_at: dict[str, list[float]]
) -> list[str]:
    """Two attempts of a job may overlap only by ranks on a node that went DOWN in between (cut off, fenced on its return).

    `down_at`: node -> wall times at which the coordinator declared it DOWN.
    """
    problems = []
    by_job: dict[str, list[RankLife]] = {}
    for life in lives:
        by_job.setdefault(life.job, []).append(life)
    for job_id, ranks in sorted(by_job.items()):
        job = jobs.get(job_id)
        ranks.sort(key=lambda life: life.start_boot)
        reported: set[tuple[int, int]] = set()
        for index, earlier in enumerate(ranks):
            for later in ranks[index + 1 :]:
                if later.attempt == earlier.attempt or (earlier.attempt, later.attempt) in reported:
                    continue
                overlap = _overlap(earlier, later)
                cut_off = any(earlier.start_wall <= down <= later.start_wall for down in down_at.get(earlier.node, ()))
                if overlap > CLOCK_SLACK and not cut_off:
                    reported.add((earlier.attempt, later.attempt))
                    problems.append(
                        f"one attempt at a time: job {job_id} attempts {earlier.attempt} and {later.attempt} ran together for at "
                        f"least {overlap:.3f}s: {later.who} started at {_clock(later.start_wall)} while {earlier.who} ran "
                        f"(alive at {_clock(earlier.alive_until_wall)}, ended by {earlier.end_how or 'still running'}); "
                        f"restart reason of attempt {later.attempt}: {_restart_reason(job, later.attempt)}"
                    )
    return problems


def check_judged_by_what_the_agent_knew(jobs: dict[str, job_pb2.Job], registered_at: dict[str, list[float]]) -> list[str]:
    """A re-registering agent's Register lists the ranks it knew when it sent it: an attempt placed after
    the coordinator took that Register in cannot be "lost" by it. (The judgment follows its registration
    within moments; one more than a second before is another registration.)"""
    problems = []
    for job_id, job in sorted(jobs.items()):
        for attempt in job.attempts:
            match = RANK_DEATH.match(attempt.end_reason)
            if not match or REREGISTERED_WITHOUT not in attempt.end_reason or not attempt.HasField("end_time"):
                continue
            node, placed, declared = (
                match.group(2),
                attempt.start_time.ToNanoseconds() / 1e9,
                attempt.end_time.ToNanoseconds() / 1e9,
            )
            registrations = [stamp for stamp in registered_at.get(node, ()) if declared - 1.0 <= stamp <= declared + CLOCK_SLACK]
            if registrations and placed > max(registrations):
                problems.append(
                    f"judged by what the agent knew: job {job_id} attempt {attempt.attempt} was placed at {_clock(placed)}, "
                    f"after node {node} registered at {_clock(max(registrations))}, and declared lost at {_clock(declared)}: "
                    f"{attempt.end_reason!r}"
                )
    return problems


def coordinator_events(coordinator_log: Path, event: str, **fields: str) -> dict[str, list[float]]:
    """node -> wall times of the coordinator's JSON log lines of `event` (with these field values)."""
    times: dict[str, list[float]] = {}
    for line in coordinator_log.read_text(errors="replace").splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == event and all(entry.get(name) == value for name, value in fields.items()):
            times.setdefault(entry["node"], []).append(datetime.datetime.fromisoformat(entry["timestamp"]).timestamp())
    return times


def check_declared_deaths(lives: list[RankLife], jobs: dict[str, job_pb2.Job]) -> list[str]:
    """An attempt that ended because "rank R on node N was killed/exited" must not have had R alive afterwards."""
    problems = []
    index = {(life.job, life.attempt, life.rank): life for life in lives}
    for job_id, job in sorted(jobs.items()):
        for attempt in job.attempts:
            match = RANK_DEATH.match(attempt.end_reason)
            if not match or not attempt.HasField("end_time"):
                continue
            life = index.get((job_id, attempt.attempt, int(match.group(1))))
            declared = attempt.end_time.ToNanoseconds() / 1e9
            if life is not None and life.alive_until_wall - declared > CLOCK_SLACK:
                problems.append(
                    f"deaths are real: job {job_id} attempt {attempt.attempt} ended at {_clock(declared)} with "
                    f"{attempt.end_reason!r}, but {life.who} was alive until at least {_clock(life.alive_until_wall)} "
                    f"(started {_clock(life.start_wall)}, ended by {life.end_how or 'still running'})"
                )
    return problems


def check_outcomes_are_true(
    lives: list[RankLife], jobs: dict[str, job_pb2.Job], plans: dict[str, JobPlan], cancelled: set[str]
) -> list[str]:
    """A job's final state tells what happened: SUCCEEDED only if every rank of its last attempt exited 0
    (by its own end line), CANCELLED only if someone cancelled it, never more attempts than its budget."""
    problems = []
    index = {(life.job, life.attempt, life.rank): life for life in lives}
    for job_id, job in sorted(jobs.items()):
        plan = plans.get(job.spec.name.removeprefix("chaos-"))
        if plan is not None and len(job.attempts) > plan.max_restarts + 1:
            problems.append(f"true outcomes: job {job_id} ran {len(job.attempts)} attempts with max_restarts {plan.max_restarts}")
        if job.state == job_pb2.JOB_STATE_CANCELLED and job_id not in cancelled:
            problems.append(f"true outcomes: job {job_id} is CANCELLED and nobody cancelled it ({job.reason})")
        if job.state != job_pb2.JOB_STATE_SUCCEEDED or not job.attempts:
            continue
        last = job.attempts[-1]
        for rank in range(last.placement.world_size):
            life = index.get((job_id, last.attempt, rank))
            if life is None or life.end_how != "exit" or life.end_code != 0:
                how = "never started" if life is None else f"ended by {life.end_how or 'still running'} with code {life.end_code}"
                problems.append(f"true outcomes: job {job_id} SUCCEEDED but rank {rank} of its attempt {last.attempt} {how}")
    return problems


def check_ranks_run_where_placed(lives: list[RankLife], jobs: dict[str, job_pb2.Job]) -> list[str]:
    """Each rank runs on the node and GPU its attempt's placement gave it."""
    problems = []
    for life in lives:
        job = jobs.get(life.job)
        attempt = next((record for record in job.attempts if record.attempt == life.attempt), None) if job else None
        if attempt is None:
            problems.append(f"placed ranks: {life.who} ran, and its job has no such attempt")
            continue
        share = next((n for n in attempt.placement.nodes if n.first_rank <= life.rank < n.first_rank + len(n.device_uuids)), None)
        placed = (share.node_id, share.device_uuids[life.rank - share.first_rank]) if share else None
        if placed != (life.node, life.gpu):
            problems.append(f"placed ranks: {life.who} ran, but its placement put rank {life.rank} on {placed}")
    return problems


def late_starts(lives: list[RankLife], jobs: dict[str, job_pb2.Job]) -> list[str]:
    """Ranks that started after the coordinator had ended their attempt: a launch still in flight (to a
    stopped agent, say) may do that, so it is counted, not failed; what it may not do is share a GPU."""
    ended = {
        (job_id, attempt.attempt): attempt.end_time.ToNanoseconds() / 1e9
        for job_id, job in jobs.items()
        for attempt in job.attempts
        if attempt.HasField("end_time")
    }
    late = []
    for life in lives:
        end = ended.get((life.job, life.attempt))
        if end is not None and life.start_wall - end > CLOCK_SLACK:
            late.append(f"{life.who} started {life.start_wall - end:.3f}s after its attempt ended")
    return late


def check_logs(paths: list[Path]) -> list[str]:
    problems = []
    for path in paths:
        lines = path.read_text(errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            sign = next((sign for sign in SIGNS_OF_A_CRASH if sign in line), None)
            if sign is None:
                continue
            try:
                entry = json.loads(line)
                last = str(entry.get("exception", "")).strip().splitlines()[-1:] or [""]
                what = f"{entry.get('event')!r} {last[0]}"
            except (ValueError, AttributeError):
                following = [later for later in lines[number : number + 40] if later and not later.startswith((" ", "\t"))]
                what = f"{line.strip()} ... {following[0] if following else ''}"
            problems.append(f"no traceback: {path.name}:{number}: {what}")
            if len(problems) > 20:
                return problems
    return problems


def _overlap(earlier: RankLife, later: RankLife) -> float:
    """Seconds both were surely alive: from the later start to the first of their (lower bounds of) ends."""
    return min(earlier.alive_until_boot, later.alive_until_boot) - later.start_boot


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(wall)) + f".{int(wall * 1000) % 1000:03d}Z"


def _restart_reason(job: job_pb2.Job | None, attempt: int) -> str:
    for record in job.attempts if job else ():
        if record.attempt == attempt:
            return record.restart_reason or "(none)"
    return "(unknown)"


def list_all_jobs(client) -> list[job_pb2.Job]:
    jobs, token = [], ""
    while True:
        page, token = client.list_jobs(page_size=500, page_token=token)
        jobs += page
        if not token:
            return jobs


# -- the test ---------------------------------------------------------------------------------------------------


@pytest.mark.timeout(FAULT_SECONDS + SETTLE_SECONDS + 150)
def test_invariants_hold_through_random_faults(cluster, run_token, tmp_path, request):
    record = tmp_path / "ranks.jsonl"
    actions, plans = make_plan(SEED, FAULT_SECONDS, run_token)
    replay = f"GPUORCH_CHAOS_SEED={SEED} GPUORCH_CHAOS_SECONDS={FAULT_SECONDS:g} python -m pytest tests/test_chaos.py"
    print(f"chaos seed {SEED}: {len(plans)} jobs, {len(actions)} actions; replay with: {replay}")
    cluster.start_coordinator()
    for node in NODES:
        cluster.add_agent(node)
    cluster.wait_for_nodes(len(NODES))
    watcher = RankWatcher(record)
    watcher.start()
    chaos = Chaos(cluster, watcher, plans, record, run_token)
    try:
        chaos.carry_out(actions)
        chaos.note("faults stop")
        chaos.heal()
        jobs = chaos.wait_until_final()
        chaos.check_daemons()
        violations = chaos.violations
        violations += check_exactly_once(list_all_jobs(cluster.client()), chaos.acknowledged, run_token)
        # Ranks of final jobs must be gone once a stop's grace period is over.
        time.sleep(0.2)

        def lingering() -> list[RankLife]:
            return [life for _, life in watcher.live() if jobs.get(life.job) and jobs[life.job].state in FINAL]

        try:
            wait_for(lambda: not lingering(), timeout=STOP_GRACE_PERIOD + 3, what="ranks of final jobs to end")
        except AssertionError:
            for life in lingering():
                state = job_pb2.JobState.Name(jobs[life.job].state)
                violations.append(f"nothing left running: {life.who} still runs, its job is {state}")
    finally:
        cluster.stop()
        watcher.stop()
    leftovers = processes_of_run(run_token)
    violations += [f"nothing left running: pid {pid} outlived the cluster: {argv}" for pid, argv in sorted(leftovers.items())]
    kill_processes_of_run(run_token)
    lives = list(watcher.lives.values())
    violations += check_no_gpu_held_twice(lives)
    coordinator_log = tmp_path / "coordinator.log"
    violations += check_one_attempt_at_a_time(
        lives, jobs, coordinator_events(coordinator_log, "node state changed", after="down")
    )
    violations += check_judged_by_what_the_agent_knew(jobs, coordinator_events(coordinator_log, "node registered"))
    violations += check_declared_deaths(lives, jobs)
    violations += check_ranks_run_where_placed(lives, jobs)
    violations += check_outcomes_are_true(lives, jobs, plans, chaos.cancelled)
    violations += check_logs(sorted(tmp_path.glob("*.log")))
    ends = {}
    for job in jobs.values():
        ends[job_pb2.JobState.Name(job.state)] = ends.get(job_pb2.JobState.Name(job.state), 0) + 1
    kinds = {}
    for action in actions:
        kinds[action.kind] = kinds.get(action.kind, 0) + 1
    late = late_starts(lives, jobs)
    summary = (
        f"chaos summary: seed {SEED}, {len(jobs)} jobs {ends}, {len(lives)} rank starts "
        f"({len(late)} after their attempt had ended), "
        f"actions {kinds}, {len(violations)} violations"
    )
    request.config.stash.setdefault(SUMMARY_LINES, []).append(summary)
    (tmp_path / "chaos-story.txt").write_text("\n".join(chaos.done) + "\n")
    (tmp_path / "chaos-jobs.json").write_text(json.dumps([json_format.MessageToDict(job) for job in jobs.values()], indent=1))
    (tmp_path / "chaos-violations.txt").write_text("".join(f"{violation}\n" for violation in violations))
    assert not violations, (
        f"{len(violations)} invariant violations (seed {SEED}; replay with: {replay}; what the test did: "
        f"{tmp_path / 'chaos-story.txt'}):\n" + "\n".join(f"- {violation}" for violation in violations)
    )


def test_the_plan_is_fixed_by_the_seed():
    first, jobs = make_plan(7, 20, "r")
    assert first == make_plan(7, 20, "r")[0] and jobs == make_plan(7, 20, "r")[1]
    assert first != make_plan(8, 20, "r")[0]
    kinds = {action.kind for action in first}
    assert {
        "submit",
        "duplicate",
        "cancel",
        "kill_rank",
        "kill_agent",
        "stop_agent",
        "kill_coordinator",
        "gpu_fault",
        "drain",
    } <= kinds
    for node in NODES:  # every fault of a node is undone by the plan itself
        for fault, undo in (("kill_agent", "restart_agent"), ("stop_agent", "cont_agent"), ("drain", "resume")):
            assert sum(a.kind == fault and a.node == node for a in first) == sum(a.kind == undo and a.node == node for a in first)


def test_the_overlap_checks_see_an_overlap_and_nothing_else():
    def life(job, attempt, rank, node, gpu, start, until):
        return RankLife(job, attempt, rank, node, gpu, 100 + rank, "r", start, 1e9 + start, until, 1e9 + until, True, 0, "exit")

    apart = [life("j1", 1, 0, "n1", "GPU-a", 0.0, 1.0), life("j2", 1, 0, "n1", "GPU-a", 1.0005, 2.0)]
    assert check_no_gpu_held_twice(apart) == []
    overlapping = [life("j1", 1, 0, "n1", "GPU-a", 0.0, 1.0), life("j2", 1, 0, "n1", "GPU-a", 0.7, 2.0)]
    (problem,) = check_no_gpu_held_twice(overlapping)
    assert (
        "GPU GPU-a on n1" in problem and "job j1 attempt 1" in problem and "job j2 attempt 1" in problem and "0.300s" in problem
    )
    nested = [life("j1", 1, 0, "n1", "GPU-a", 0.0, 5.0), life("j2", 1, 0, "n1", "GPU-a", 1.0, 1.25)]
    assert "at least 0.250s" in check_no_gpu_held_twice(nested)[0], "a rank that starts and ends within another's life"
    restarted = [life("j1", 1, 0, "n1", "GPU-a", 0.0, 1.0), life("j1", 2, 0, "n2", "GPU-b", 0.5, 2.0)]
    placements = job_pb2.Job(job_id="j1")
    placements.attempts.add(attempt=1).placement.nodes.add(node_id="n1", device_uuids=["GPU-a"])
    placements.attempts.add(attempt=2).placement.nodes.add(node_id="n2", device_uuids=["GPU-c"])
    (problem,) = check_ranks_run_where_placed(restarted, {"j1": placements})
    assert "attempt 2 rank 0 (node n2, GPU GPU-b" in problem and "('n2', 'GPU-c')" in problem
    job = job_pb2.Job(
        job_id="j1", attempts=[job_pb2.Attempt(attempt=1), job_pb2.Attempt(attempt=2, restart_reason="rank_exit:0:137")]
    )
    (problem,) = check_one_attempt_at_a_time(restarted, {"j1": job}, {})
    assert "job j1 attempts 1 and 2 ran together for at least 0.500s" in problem and "rank_exit:0:137" in problem
    cut_off = {"n1": [1e9 + 0.4]}
    assert check_one_attempt_at_a_time(restarted, {"j1": job}, cut_off) == [], (
        "ranks cut off on a DOWN node may outlive their attempt"
    )
    assert len(check_one_attempt_at_a_time(restarted, {"j1": job}, {"n1": [1e9 + 0.6]})) == 1, "down only after the restart"


def test_a_rank_placed_after_the_register_cannot_be_lost_by_it():
    def attempt(placed, declared):
        record = job_pb2.Attempt(
            attempt=1, end_reason=f"rank 0 on node n3 was killed by signal 9 ({REREGISTERED_WITHOUT}; its process is gone)"
        )
        record.start_time.FromNanoseconds(int(placed * 1e9))
        record.end_time.FromNanoseconds(int(declared * 1e9))
        return job_pb2.Job(job_id="j1", attempts=[record])

    registered = {"n3": [100.0, 200.0]}
    (problem,) = check_judged_by_what_the_agent_knew({"j1": attempt(200.0006, 200.0007)}, registered)
    assert "job j1 attempt 1 was placed" in problem and "after node n3 registered" in problem
    assert check_judged_by_what_the_agent_knew({"j1": attempt(150.0, 200.0007)}, registered) == [], "placed before: may be lost"
    assert check_judged_by_what_the_agent_knew({"j1": attempt(150.0, 160.0)}, registered) == [], "no registration then"


def test_the_run_token_finds_the_processes_of_the_run_and_only_them(tmp_path):
    token = f"chaos-probe-{os.getpid()}"
    marked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", token])
    unmarked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", token + "x"])
    try:
        assert list(processes_of_run(token)) == [marked.pid]
        kill_processes_of_run(token)
        assert marked.wait(5) == -signal.SIGKILL and unmarked.poll() is None
    finally:
        for process in (marked, unmarked):
            process.kill()
            process.wait(5)


def test_a_final_state_must_tell_what_happened():
    plans = {"r-000": JobPlan("r-000", 2, 0, 1, 1.0, "", 0.0)}

    def job(state, attempts):
        record = job_pb2.Job(job_id="j1", state=state, spec=job_pb2.JobSpec(name="chaos-r-000"))
        for number in range(1, attempts + 1):
            record.attempts.add(attempt=number).placement.world_size = 2
        return record

    def life(rank, how, code):
        return RankLife("j1", 1, rank, "n1", f"GPU-{rank}", 100 + rank, "r-000", 0.0, 0.0, 1.0, 1.0, True, code, how)

    succeeded = job(job_pb2.JOB_STATE_SUCCEEDED, 1)
    assert check_outcomes_are_true([life(0, "exit", 0), life(1, "exit", 0)], {"j1": succeeded}, plans, set()) == []
    (problem,) = check_outcomes_are_true([life(0, "exit", 0), life(1, "exit", 3)], {"j1": succeeded}, plans, set())
    assert "SUCCEEDED but rank 1 of its attempt 1 ended by exit with code 3" in problem
    (problem,) = check_outcomes_are_true([life(0, "exit", 0)], {"j1": succeeded}, plans, set())
    assert "rank 1 of its attempt 1 never started" in problem
    cancelled = job(job_pb2.JOB_STATE_CANCELLED, 1)
    assert check_outcomes_are_true([], {"j1": cancelled}, plans, {"j1"}) == []
    assert "nobody cancelled it" in check_outcomes_are_true([], {"j1": cancelled}, plans, set())[0]
    assert (
        "ran 3 attempts with max_restarts 1"
        in check_outcomes_are_true([], {"j1": job(job_pb2.JOB_STATE_FAILED, 3)}, plans, set())[0]
    )
