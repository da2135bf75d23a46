"""Starts one rank, waits for it and records how it ended, so that ranks outlive the agent.

The agent cannot wait for a process that is not its child, and a restarted agent is
never the parent of the ranks its predecessor started. So every rank is started by
this shim, which stays its parent: it records the rank's pid, waits for it, and
writes its exit status to a file any later agent can read.

Run by the supervisor as

    python -I -S shim.py --notify-fd 3 --env-fd 4 --pid-file P --exit-file E --cwd DIR [--uid U --gid G --groups G,...] -- ARGV...

with stdin on /dev/null and stdout/stderr on the rank's log (the supervisor opens
them when it spawns the shim, so even a crash of the shim lands in the log), little
of the agent's environment and nothing of the job's, and the rank's environment on --env-fd as
NUL-separated NAME=VALUE entries: only the rank's exec gets it, after the switch of
user, so a job's LD_PRELOAD never reaches a process that runs as root.

With --uid, the shim keeps the agent's identity (root), so the records it writes stay out
of the rank's reach, and starts the rank as that uid, gid and groups.

It is on the launch latency path: it imports only modules that are built into the
interpreter or already loaded at start-up (`-S` skips site; `_signal` instead of
`signal`, which would pull in enum), and nothing from gpuorch.

Process groups: the shim leads its own session; the rank gets a process group of its
own (pgid = rank pid) inside that session. The agent signals the rank's group, so a
SIGKILL escalation never hits the shim and the true exit status is always recorded.

Files it writes (each atomically, tmp file + rename, so a reader never sees half):
    pid file:  "<rank pid>\\n", once the rank was started
    exit file: "exit_code=N" or "signal=N" or "failed_to_start=<why>", plus "rank_pid=N"
Notification (on --notify-fd, then closed): "started <pid>\\n" or "failed <why>\\n".
"""

import _signal
import os
import sys

# Signals Python sets to "ignore" at start-up; an ignored signal stays ignored across
# exec, so the rank must get them back at their defaults.
SIGNALS_RESET_FOR_RANK = (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)
# Signals sent to the shim alone (an operator's `kill <shim pid>`) are passed on to the rank;
# the shim itself keeps running to record the exit status.
FORWARDED_SIGNALS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGQUIT, _signal.SIGUSR1, _signal.SIGUSR2)


def parse_args(args: list[str]) -> tuple[dict[str, str], list[str]]:
    options: dict[str, str] = {}
    while args and args[0] != "--":
        if len(args) < 2 or not args[0].startswith("--"):
            raise SystemExit(f"gpuorch shim: bad arguments {args!r}")
        options[args[0][2:]] = args[1]
        args = args[2:]
    return options, args[1:]


def write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, text.encode("utf-8", "surrogateescape"))
    finally:
        os.close(fd)
    os.replace(temporary, path)


def notify(fd: int, text: str) -> None:
    if fd < 0:
        return
    try:
        os.write(fd, text.encode("utf-8", "surrogateescape"))
        os.close(fd)
    except OSError:
        pass  # the agent that launched us is gone; the files are what count


def one_line(text: str) -> str:
    return text.replace("\n", " ").strip()


def parse_identity(options: dict[str, str]) -> tuple[int, int, list[int]] | None:
    """(uid, gid, supplementary gids) to run the rank as, from --uid/--gid/--groups; None = as the shim."""
    if "uid" not in options:
        return None
    return int(options["uid"]), int(options["gid"]), [int(gid) for gid in options.get("groups", "").split(",") if gid]


def read_environment(fd: int) -> dict[str, str]:
    """The rank's environment from `fd` (then closed).

    Without --env-fd, the shim's own: an agent from before the environment moved to a descriptor,
    still running after an upgrade installed this shim, passes it that way."""
    if fd < 0:
        return dict(os.environ)
    data = b""
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    os.close(fd)
    env = {}
    for entry in data.split(b"\0"):
        name, equals, value = entry.partition(b"=")
        if equals:
            env[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return env


def start_rank(argv: list[str], cwd: str, identity: tuple[int, int, list[int]] | None, env: dict[str, str]) -> tuple[int, str]:
    """Forks and execs the rank in a process group of its own; returns (pid, "") or (0, why it failed).

    The child drops to the owner's identity before it enters the working directory and
    execs, so both are checked with the owner's permissions, not root's. A failure in the
    child comes back over a close-on-exec pipe: end of file without a word means exec worked.
    """
    error_read, error_write = os.pipe()  # close-on-exec, as every descriptor Python makes
    pid = os.fork()
    if pid == 0:
        step = "cannot start the rank"
        try:
            os.close(error_read)
            os.setpgid(0, 0)
            for signum in SIGNALS_RESET_FOR_RANK:
                _signal.signal(signum, _signal.SIG_DFL)
            if identity is not None:
                uid, gid, groups = identity
                step = f"cannot switch to uid {uid} gid {gid}"
                os.setgroups(groups)
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
            step = f"cannot enter working directory {cwd!r}"
            os.chdir(cwd)
            step = f"cannot execute {argv[0]!r}"
            os.execvpe(argv[0], argv, env)
        except BaseException as error:  # noqa: BLE001 - whatever it was, the parent must hear of it
            why = getattr(error, "strerror", None) or str(error)
            try:
                os.write(error_write, f"{step}: {why}".encode("utf-8", "surrogateescape"))
            except BaseException:  # noqa: BLE001
                pass
        finally:
            os._exit(127)
    os.close(error_write)
    try:
        os.setpgid(pid, pid)  # also from this side, so the group exists before anyone signals it
    except OSError:
        pass  # the child already did it, or already exec'd
    report = b""
    while True:
        data = os.read(error_read, 4096)
        if not data:
            break
        report += data
    os.close(error_read)
    if not report:
        return pid, ""
    os.waitpid(pid, 0)  # the child has exited (127); reap it
    return 0, report.decode("utf-8", "replace")


def main() -> int:
    options, argv = parse_args(sys.argv[1:])
    notify_fd = int(options.get("notify-fd", "-1"))
    env_fd = int(options.get("env-fd", "-1"))
    pid_file = options["pid-file"]
    exit_file = options["exit-file"]
    if notify_fd >= 0:
        os.set_inheritable(notify_fd, False)
    rank_env = read_environment(env_fd)
    # Descriptors the agent leaked without close-on-exec (a listening socket would keep
    # the agent's port busy after a restart) must not reach the rank.
    os.closerange(max(notify_fd, 2) + 1, 1 << 16)
    if os.getsid(0) != os.getpid():
        os.setsid()

    failure = ""
    rank_pid = 0
    if not argv:
        failure = "empty argv: nothing to execute"
    else:
        rank_pid, failure = start_rank(argv, options.get("cwd") or ".", parse_identity(options), rank_env)
    if failure:
        write_atomically(exit_file, f"failed_to_start={one_line(failure)}\n")
        notify(notify_fd, f"failed {one_line(failure)}\n")
        print(f"gpuorch: {failure}", file=sys.stderr, flush=True)
        return 127

    def forward(signum: int, _frame: object) -> None:
        try:
            os.killpg(rank_pid, signum)
        except OSError:
            pass

    for signum in FORWARDED_SIGNALS:
        _signal.signal(signum, forward)

    write_atomically(pid_file, f"{rank_pid}\n")
    notify(notify_fd, f"started {rank_pid}\n")

    # Wait without reaping first: while the rank is a zombie its pid (and so its process
    # group id) cannot be reused, so killing what it left behind in its group is safe.
    os.waitid(os.P_PID, rank_pid, os.WEXITED | os.WNOWAIT)
    try:
        os.killpg(rank_pid, _signal.SIGKILL)  # helpers the rank left running must not keep holding its GPUs
    except OSError:
        pass
    _, status = os.waitpid(rank_pid, 0)
    code = os.waitstatus_to_exitcode(status)
    outcome = f"signal={-code}" if code < 0 else f"exit_code={code}"
    write_atomically(exit_file, f"{outcome}\nrank_pid={rank_pid}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
