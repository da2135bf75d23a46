"""Running-GPU quotas per owner and per group during one pass: what running jobs hold plus what the pass places."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from coordinator.scheduler.types import JobRequest, Quotas, RunningJob


def _cap(caps: Mapping[str, int], name: str) -> tuple[int, str]:
    """(the cap on `name`, the key it came from: the name, or "*" for everyone not named)."""
    cap, key = caps.get(name), name
    if cap is None:
        cap, key = caps.get("*", 0), "*"
    return (cap if cap > 0 else 0), key


def _setting(table: str, key: str) -> str:
    """The coordinator setting a cap came from, as operators write it (coordinator/rules/quotas.py)."""
    return f'quotas.{table}."*".max_gpus' if key == "*" else f"quotas.{table}.{key}.max_gpus"


class _QuotaLedger:
    """GPUs held per owner and per group; `blocked` says which quota a job would exceed."""

    __slots__ = ("by_group", "by_owner", "quotas")

    def __init__(self, quotas: Quotas, running: Iterable[RunningJob]) -> None:
        self.quotas = quotas
        self.by_owner: dict[str, int] = {}
        self.by_group: dict[str, int] = {}
        if not self.active:
            return
        for job in running:  # a stopping job still holds its GPUs until it ends
            self._add(job.owner, job.group, job.gpus)

    @property
    def active(self) -> bool:
        return bool(self.quotas.max_gpus_per_owner or self.quotas.max_gpus_per_group)

    def _add(self, owner: str, group: str, gpus: int) -> None:
        self.by_owner[owner] = self.by_owner.get(owner, 0) + gpus
        if group:
            self.by_group[group] = self.by_group.get(group, 0) + gpus

    def charge(self, job: JobRequest) -> None:
        if self.active:
            self._add(job.owner, job.group, job.gpus)

    def blocked(self, job: JobRequest) -> str | None:
        """Why the job may not start now because of a quota, naming it and the numbers; None if no quota holds it."""
        quotas = self.quotas
        if quotas.max_gpus_per_owner:
            cap, key = _cap(quotas.max_gpus_per_owner, job.owner)
            held = self.by_owner.get(job.owner, 0)
            if cap and held + job.gpus > cap:
                return (
                    f"quota: {job.owner or 'the anonymous owner'} runs {held} of the {cap} GPUs {_setting('users', key)} "
                    f"allows and this job needs {job.gpus}"
                )
        if quotas.max_gpus_per_group and job.group:
            cap, key = _cap(quotas.max_gpus_per_group, job.group)
            held = self.by_group.get(job.group, 0)
            if cap and held + job.gpus > cap:
                return (
                    f"quota: group {job.group} runs {held} of the {cap} GPUs {_setting('groups', key)} allows "
                    f"and this job needs {job.gpus}"
                )
        return None
