"""Directories the agent makes for a rank (its checkpoint and default work directory), safe to hand over.

A checkpoint root may be shared by every user of the cluster, and job ids can be guessed:
a user who plants `<checkpoint_root>/<next job id>` (a symlink into their own directory, or
a directory of their own) would receive another user's checkpoints and could feed it
poisoned ones. So a directory the agent gives a rank must be a real directory (no symlink
anywhere the agent creates or opens it: every component is opened relative to its parent
with O_NOFOLLOW), owned by the rank's user and not writable by group or others; one that
is not makes the rank fail to start, with the reason.

The components above the first missing one are the operator's (the checkpoint root, or the
agent's state dir) and are followed as they are, symlinks included (a checkpoint root may
well be a symlink to shared storage).
"""

from __future__ import annotations

import os
import stat


class UnsafeDirectory(Exception):
    """An existing directory that must not be handed to the rank; the message says why."""


def describe_uid(uid: int) -> str:
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_owned(fd: int, path: str, uid: int) -> None:
    """Raises UnsafeDirectory unless the directory open on `fd` belongs to `uid` and only `uid` may write it."""
    info = os.fstat(fd)
    if info.st_uid != uid:
        raise UnsafeDirectory(f"{path!r} belongs to {describe_uid(info.st_uid)}, not to the job's user {describe_uid(uid)}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeDirectory(f"{path!r} is writable by its group or by others (mode {stat.S_IMODE(info.st_mode):04o})")


def open_component(name: str, parent_fd: int, path: str) -> int:
    """Opens directory `name` in `parent_fd` without following a symlink; UnsafeDirectory if it is none."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    except OSError as error:
        if os.path.islink(os.path.join(f"/proc/self/fd/{parent_fd}", name)):
            raise UnsafeDirectory(f"{path!r} is a symbolic link, not a directory") from None
        if error.errno == 20:  # ENOTDIR
            raise UnsafeDirectory(f"{path!r} is not a directory") from None
        raise


def ensure_owned_directory(path: str, uid: int, gid: int, *, mode: int = 0o700) -> bool:
    """Makes `path` a directory the rank's user (`uid`, `gid`) owns and alone may write; True if it made it.

    Missing components are created one by one (the last with `mode`, given to uid:gid; those
    before it 0755 and the agent's), each opened without following symlinks; an existing last
    component is checked as it is. Raises UnsafeDirectory (the reason) or OSError (e.g. a
    read-only file system)."""
    path = os.path.abspath(path)
    components = []
    existing = path
    while not os.path.lexists(existing):
        existing, name = os.path.split(existing)
        components.append(name)
    components.reverse()
    if not components:  # it exists: open its parent (followed: the operator's), then it, without following
        existing, name = os.path.split(path)
        components_to_open, components = [name], []
    else:
        components_to_open = []
    fd = os.open(existing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in components_to_open:
            child = open_component(name, fd, path)
            os.close(fd)
            fd = child
        if components_to_open:
            check_owned(fd, path, uid)
            return False
        for index, name in enumerate(components):
            last = index == len(components) - 1
            try:
                os.mkdir(name, mode if last else 0o755, dir_fd=fd)
            except FileExistsError:
                if last:  # someone made it meanwhile: it is theirs, so it must pass the checks
                    child = open_component(name, fd, path)
                    os.close(fd)
                    fd = child
                    check_owned(fd, path, uid)
                    return False
            child = open_component(name, fd, os.path.join(existing, *components[: index + 1]))
            os.close(fd)
            fd = child
        if os.geteuid() == 0:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)  # whatever the umask took away
        return True
    finally:
        os.close(fd)
