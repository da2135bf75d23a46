"""A rank's result and its job's dependency results: two files beside the rank's log.

jobs/<job_id>/attempt-<n>/rank-<r>.result         gpuorch.worker.report_result() writes it (GPUORCH_RESULT_FILE);
                                                   read once the rank ended, sent in its TaskStatus
jobs/<job_id>/attempt-<n>/rank-<r>.dependencies   the results of the jobs it runs --after, from the launch
                                                   (GPUORCH_DEPENDENCY_RESULTS)

They live in the agent's directory, not in the rank's working directory: that one may be shared by many
jobs (the submit dir), and an agent running as root writes nothing into a directory its users control.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from agent.identity import RankIdentity
from gpuorch.arrays import MAX_RESULT_BYTES
from gpuorch.v1 import agent_pb2


def result_path(rank_base: Path) -> Path:
    return rank_base.with_suffix(".result")


def dependencies_path(rank_base: Path) -> Path:
    return rank_base.with_suffix(".dependencies")


def _create(path: str, identity: RankIdentity, text: str, mode: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    if identity.switch:
        os.chown(path, identity.uid, identity.gid, follow_symlinks=False)


def prepare(rank_base: Path, launch: agent_pb2.LaunchTask, identity: RankIdentity) -> dict[str, str]:
    """Makes the rank's (empty) result file, its user's to write, and the dependency results file when the
    launch brings some; returns the variables that name them."""
    result_file = str(result_path(rank_base))
    _create(result_file, identity, "", 0o600)
    env = {"GPUORCH_RESULT_FILE": result_file}
    if launch.dependency_results_json:
        dependencies_file = str(dependencies_path(rank_base))
        _create(dependencies_file, identity, launch.dependency_results_json, 0o400)
        env["GPUORCH_DEPENDENCY_RESULTS"] = dependencies_file
    return env


def read_result(rank_base: Path) -> str:
    """The JSON object the rank reported, or "" when it reported none, or something that is not a JSON object
    of at most MAX_RESULT_BYTES (the rank's own report_result() refuses those; a rank may write the file itself)."""
    try:
        fd = os.open(result_path(rank_base), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    try:
        data = os.read(fd, MAX_RESULT_BYTES + 1)
    finally:
        os.close(fd)
    if not data or len(data) > MAX_RESULT_BYTES:
        return ""
    try:
        value = json.loads(data)
    except ValueError:
        return ""
    return data.decode() if isinstance(value, dict) else ""
