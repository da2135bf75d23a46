"""Starts one rank, waits for it and records how it ended, so that ranks outlive the agent.

The agent cannot wait for a process that is not its child, and a restarted agent is
never the parent of the ranks its predecessor started. So every rank is started by
this shim, which stays its parent: it records the rank's pid, waits for it, and
writes its exit status to a file any later agent can read.

Run by the supervisor as

    python -I -S shim.py --notify-fd 3 --env-fd 4 --pid-file P --exit-file E --cwd DIR [--cwd-fallback DIR]
        [--uid U --gid G --groups G,...] [--cgroup DIR] [--log-file P --max-log-bytes N] [--tty 1] -- ARGV...

with stdin on /dev/null and stdout/stderr on the rank's log (the supervisor opens
them when it spawns the shim, so even a crash of the shim lands in the log), little
of the agent's environment and nothing of the job's, and the rank's environment on --env-fd as
NUL-separated NAME=VALUE entries: only the rank's exec gets it, after the switch of
user, so a job's LD_PRELOAD never reaches a process that runs as root.

With --uid, the shim keeps the agent's identity (root), so the records it writes stay out
of the rank's reach, and starts the rank as that uid, gid and groups. The working directory
is entered after that switch, so whether it exists is learnt with the owner's permissions,
never root's; with --cwd-fallback, a --cwd the owner cannot enter gives way to the fallback.

With --cgroup, the rank joins that cgroup (before it drops root: the cgroup is root's, so the
rank cannot leave it) and everything it starts stays there, setsid() or not; when the rank
ends, the shim kills what is left in the cgroup and records the end only once it is empty.

With --max-log-bytes, the shim rotates the rank's log (see rotate_log).

With --tty 1, stdin, stdout and stderr are a terminal (a pty the agent holds, for an interactive
job's rank 0 or `gpuctl exec -t`): the rank leads a session of its own with that terminal as its
controlling terminal (so Ctrl-C and window sizes reach it), instead of only a process group.

It is on the launch latency path: it imports only modules that are built into the
interpreter or already loaded at start-up (`-S` skips site; `_signal` instead of
`signal`, which would pull in enum), and nothing from gpuorch.

Process groups: the shim leads its own session; the rank gets a process group of its
own (pgid = rank pid) inside that session. The agent signals the rank's group, so a
SIGKILL escalation never hits the shim and the true exit status is always recorded.

Files it writes (each atomically, tmp file + rename, so a reader never sees half):
    pid file:  "<rank pid>\\n", once the rank was started
    exit file: "exit_code=N" or "signal=N" or "failed_to_start=<why>", plus "rank_pid=N"
Notification (on --notify-fd, then closed): "started <pid> <working dir, hex>\\n" or "failed <why>\\n".
"""

import _signal  # type: ignore[import-not-found]  # built in, and without stubs
import os
import sys
import time  # not gpuorch.clock: under -I -S gpuorch cannot be imported (see above); only waits are timed here

CGROUP_EMPTY_WAIT = 10.0
"""Seconds the shim waits for the rank's cgroup to empty after killing it (then the agent takes over)."""
LOG_CHECK_INTERVAL = 0.5
"""Seconds between checks of the log's size, with --max-log-bytes."""

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


def write_cgroup_file(cgroup: str, name: str, text: str) -> None:
    fd = os.open(f"{cgroup}/{name}", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def cgroup_empty(cgroup: str) -> bool:
    try:
        with open(f"{cgroup}/cgroup.events", "rb") as events:
            return b"populated 0" in events.read().splitlines()
    except FileNotFoundError:
        return True


def empty_cgroup(cgroup: str) -> None:
    """Kills whatever the rank left in its cgroup and waits (a while) until none of it lives."""
    deadline = time.monotonic() + CGROUP_EMPTY_WAIT
    while not cgroup_empty(cgroup) and time.monotonic() < deadline:
        try:
            write_cgroup_file(cgroup, "cgroup.kill", "1")
        except OSError:  # before Linux 5.14: kill what is there (the agent freezes and retries if need be)
            try:
                with open(f"{cgroup}/cgroup.procs", "rb") as listed:
                    pids = [int(pid) for pid in listed.read().split()]
            except OSError:
                pids = []
            for pid in pids:
                try:
                    os.kill(pid, _signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(0.02)


def rotate_log(path: str, limit: int) -> None:
    """Moves the log's content to <path>.1 (replacing an older one) and empties the log, once it is over `limit`.

    Why this way: the rank writes straight into the log file (stdout and stderr are the file
    itself, opened O_APPEND), so no process copies its output byte by byte, and the rank lives
    on when the shim is killed; a pipe through the shim would cost a copy of every byte and kill
    the rank with SIGPIPE when the shim dies. The rank's descriptor cannot be pointed at a new
    file, so the rotation copies the content within the kernel (copy_file_range) and truncates
    the file, which O_APPEND writers then continue from its start. Bytes the rank writes between
    the last copy and the truncation (microseconds) are lost; output beyond the limit within one
    LOG_CHECK_INTERVAL is kept.
    """
    try:
        source = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        info = os.fstat(source)
        if info.st_size <= limit or (info.st_dev, info.st_ino) != (os.fstat(1).st_dev, os.fstat(1).st_ino):
            return
        temporary = f"{path}.1.tmp"
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        target = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if os.geteuid() == 0:
                os.fchown(target, info.st_uid, info.st_gid)  # the owner's, like the log
            copied = 0
            for _ in range(8):  # copy what is there, then what came meanwhile, until it stops growing
                end = os.fstat(source).st_size
                if end == copied:
                    break
                while copied < end:
                    try:
                        done = os.copy_file_range(source, target, end - copied, copied, copied)
                    except OSError:  # a file system without it: copy through user space
                        data = os.pread(source, min(end - copied, 1 << 20), copied)
                        done = os.pwrite(target, data, copied)
                    if done <= 0:
                        break
                    copied += done
            os.ftruncate(1, 0)
        finally:
            os.close(target)
        os.replace(temporary, f"{path}.1")
    except OSError as error:
        print(f"gpuorch: cannot rotate the log {path!r}: {error}", file=sys.stderr, flush=True)
    finally:
        os.close(source)


def start_rank(
    argv: list[str],
    cwd: str,
    identity: tuple[int, int, list[int]] | None,
    env: dict[str, str],
    *,
    cwd_fallback: str = "",
    cgroup: str = "",
    tty: bool = False,
) -> tuple[int, str, str]:
    """Forks and execs the rank in a process group (and cgroup) of its own; returns (pid, working
    dir, "") or (0, "", why it failed).

    The child drops to the owner's identity before it enters the working directory and
    execs, so both are checked with the owner's permissions, not root's. The child reports
    over a close-on-exec pipe: "C<dir>\\0" once it entered its working directory, then
    "E<why>" if something failed; end of file without an "E" means exec worked.
    """
    error_read, error_write = os.pipe()  # close-on-exec, as every descriptor Python makes
    pid = os.fork()
    if pid == 0:
        step = "cannot start the rank"
        try:
            os.close(error_read)
            if tty:
                os.login_tty(0)  # a session of its own (pgid = pid, as below), the terminal on 0 its controlling one
            else:
                os.setpgid(0, 0)
            if cgroup:
                step = f"cannot join the rank's cgroup {cgroup!r}"
                write_cgroup_file(cgroup, "cgroup.procs", "0")
            for signum in SIGNALS_RESET_FOR_RANK:
                _signal.signal(signum, _signal.SIG_DFL)
            if identity is not None:
                uid, gid, groups = identity
                step = f"cannot switch to uid {uid} gid {gid}"
                os.setgroups(groups)
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
            step = f"cannot enter working directory {cwd!r}"
            used = cwd
            try:
                os.chdir(cwd)
            except OSError:
                if not cwd_fallback:
                    raise
                step = f"cannot enter working directory {cwd_fallback!r}"
                used = cwd_fallback
                os.chdir(cwd_fallback)
            os.write(error_write, b"C" + used.encode("utf-8", "surrogateescape") + b"\0")
            step = f"cannot execute {argv[0]!r}"
            os.execvpe(argv[0], argv, env)
        except BaseException as error:  # noqa: BLE001 - whatever it was, the parent must hear of it
            why = getattr(error, "strerror", None) or str(error)
            try:
                os.write(error_write, f"E{step}: {why}".encode("utf-8", "surrogateescape"))
            except BaseException:  # noqa: BLE001
                pass
        finally:
            os._exit(127)
    os.close(error_write)
    try:
        if not tty:  # (a group leader could not setsid(): with a terminal only the child makes its group)
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
    entered, _, failure = report.partition(b"\0") if report.startswith(b"C") else (b"", b"", report)
    if not failure:
        return pid, entered[1:].decode("utf-8", "surrogateescape"), ""
    os.waitpid(pid, 0)  # the child has exited (127); reap it
    return 0, "", failure.removeprefix(b"E").decode("utf-8", "replace")


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
    working_dir = ""
    cgroup = options.get("cgroup", "")
    if not argv:
        failure = "empty argv: nothing to execute"
    else:
        rank_pid, working_dir, failure = start_rank(
            argv,
            options.get("cwd") or ".",
            parse_identity(options),
            rank_env,
            cwd_fallback=options.get("cwd-fallback", ""),
            cgroup=cgroup,
            tty=options.get("tty") == "1",
        )
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

    log_file, max_log_bytes = options.get("log-file", ""), int(options.get("max-log-bytes", "0"))
    if log_file and max_log_bytes:
        _signal.signal(_signal.SIGALRM, lambda _signum, _frame: rotate_log(log_file, max_log_bytes))
        _signal.setitimer(_signal.ITIMER_REAL, LOG_CHECK_INTERVAL, LOG_CHECK_INTERVAL)

    write_atomically(pid_file, f"{rank_pid}\n")
    notify(notify_fd, f"started {rank_pid} {working_dir.encode('utf-8', 'surrogateescape').hex()}\n")

    # Wait without reaping first: while the rank is a zombie its pid (and so its process
    # group id) cannot be reused, so killing what it left behind in its group is safe.
    os.waitid(os.P_PID, rank_pid, os.WEXITED | os.WNOWAIT)
    try:
        os.killpg(rank_pid, _signal.SIGKILL)  # helpers the rank left running must not keep holding its GPUs
    except OSError:
        pass
    if cgroup:
        empty_cgroup(cgroup)  # and those that left its process group with setsid()
    if log_file and max_log_bytes:
        _signal.setitimer(_signal.ITIMER_REAL, 0, 0)
    _, status = os.waitpid(rank_pid, 0)
    code = os.waitstatus_to_exitcode(status)
    outcome = f"signal={-code}" if code < 0 else f"exit_code={code}"
    write_atomically(exit_file, f"{outcome}\nrank_pid={rank_pid}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
