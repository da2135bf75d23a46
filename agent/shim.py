"""Starts one rank, waits for it and records how it ended, so that ranks outlive the agent.

The agent cannot wait for a process that is not its child, and a restarted agent is
never the parent of the ranks its predecessor started. So every rank is started by
this shim, which stays its parent: it records the rank's pid, waits for it, and
writes its exit status to a file any later agent can read.

Run by the supervisor as

    python -I -S shim.py --notify-fd 3 --pid-file P --exit-file E --cwd DIR -- ARGV...

with stdin on /dev/null and stdout/stderr on the rank's log (the supervisor opens
them when it spawns the shim, so even a crash of the shim lands in the log).

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


def main() -> int:
    options, argv = parse_args(sys.argv[1:])
    notify_fd = int(options.get("notify-fd", "-1"))
    pid_file = options["pid-file"]
    exit_file = options["exit-file"]
    if notify_fd >= 0:
        os.set_inheritable(notify_fd, False)
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
        try:
            os.chdir(options.get("cwd") or ".")
        except OSError as error:
            failure = f"cannot enter working directory {options.get('cwd')!r}: {error.strerror}"
    if not failure:
        try:
            rank_pid = os.posix_spawnp(
                argv[0],
                argv,
                os.environ,
                setpgroup=0,
                setsigmask=(),
                setsigdef=SIGNALS_RESET_FOR_RANK,
            )
        except OSError as error:
            failure = f"cannot execute {argv[0]!r}: {error.strerror}"
        except ValueError as error:  # e.g. an embedded NUL byte in argv or env
            failure = f"cannot execute {argv[0]!r}: {error}"
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
