"""Quotas per user and per group: the settings (TOML, validation), the policy, and the submit-time pending check."""

from __future__ import annotations

import pytest

from coordinator.control.cluster_view import ClusterView
from coordinator.control.job_manager import JobManager, QuotaExceeded
from coordinator.rules.liveness import LivenessPolicy
from coordinator.rules.quotas import QuotaPolicy, parse_quotas, pending_quota_problem
from coordinator.settings import CoordinatorSettings
from coordinator.store.memory import MemoryJobStore
from gpuorch.settings import load_settings
from gpuorch.v1 import job_pb2

CONFIG = """
max_pending_jobs_per_user = 50

[groups]
vision = ["alice", "bob"]
nlp = ["carol"]

[quotas.users."*"]
max_gpus = 16
[quotas.users.alice]
max_gpus = 8
max_pending_jobs = 2
[quotas.groups.vision]
max_gpus = 12
max_pending_jobs = 3
[quotas.groups."*"]
max_pending_jobs = 1
"""


def settings_from(tmp_path, text: str) -> CoordinatorSettings:
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return load_settings(CoordinatorSettings, config_file=path, env={})


def test_the_toml_gives_users_groups_and_defaults(tmp_path):
    policy = settings_from(tmp_path, CONFIG).quota_policy()
    assert policy.group_of("bob") == "vision" and policy.group_of("dave") == ""
    assert policy.user_limit("alice", "max_gpus") == (8, "quotas.users.alice.max_gpus")
    assert policy.user_limit("bob", "max_gpus") == (16, 'quotas.users."*".max_gpus')
    assert policy.user_limit("bob", "max_pending_jobs") is None  # falls back to max_pending_jobs_per_user
    assert policy.group_limit("nlp", "max_pending_jobs") == (1, 'quotas.groups."*".max_pending_jobs')
    assert policy.group_limit("", "max_pending_jobs") is None
    assert policy.max_gpus() == ({"*": 16, "alice": 8}, {"vision": 12})


def test_the_scheduler_is_given_the_running_gpu_caps(tmp_path):
    quotas = settings_from(tmp_path, CONFIG).scheduler_config().quotas
    assert quotas.max_gpus_per_owner == {"*": 16, "alice": 8}
    assert quotas.max_gpus_per_group == {"vision": 12}


@pytest.mark.parametrize(
    ("quotas", "groups", "message"),
    [
        (
            {"users": {"alice": {"max_gpu": 8}}},
            {},
            r"quotas.users.alice: unknown key 'max_gpu' \(known: max_gpus, max_pending",
        ),
        ({"users": {"alice": {"max_gpus": -1}}}, {}, "quotas.users.alice.max_gpus must be an integer >= 0"),
        ({"users": {"alice": {"max_gpus": "8"}}}, {}, "quotas.users.alice.max_gpus must be an integer"),
        ({"users": {"alice": {"max_gpus": True}}}, {}, "quotas.users.alice.max_gpus must be an integer"),
        ({"users": {"alice": 8}}, {}, "quotas.users.alice must be a table"),
        ({"people": {}}, {}, "quotas: unknown key 'people' [(]known: users, groups[)]"),
        ({"groups": {"vision": {"max_gpus": 8}}}, {}, "quotas.groups.vision: no such group; name its users under \\[groups\\]"),
        ({}, {"vision": "alice"}, "groups.vision must be a list of user names"),
        ({}, {"vision": ["alice"], "nlp": ["alice"]}, "user 'alice' is in both 'vision' and 'nlp'; a user has one group"),
        ({}, {"*": ["alice"]}, "groups: '[*]' is not a group name"),
        ("max_gpus=8", {}, "quotas must be a table"),
    ],
)
def test_bad_quota_settings_are_refused_naming_what_is_wrong(quotas, groups, message):
    with pytest.raises(ValueError, match=message):
        CoordinatorSettings(quotas=quotas, groups=groups).validate()


def test_a_bad_quota_in_the_toml_file_is_refused_at_validation(tmp_path):
    with pytest.raises(ValueError, match=r"quotas\.users\.alice\.max_pending_jobs must be an integer >= 0"):
        settings_from(tmp_path, "[quotas.users.alice]\nmax_pending_jobs = -3\n").validate()


def test_the_pending_check_names_the_quota_that_holds():
    users = {"alice": {"max_pending_jobs": 2}, "*": {"max_pending_jobs": 5}}
    policy = parse_quotas({"users": users, "groups": {"vision": {"max_pending_jobs": 3}}}, {"vision": ["alice", "bob"]})
    assert pending_quota_problem(policy, "alice", {"alice": 1}, 100) is None
    assert pending_quota_problem(policy, "alice", {"alice": 2}, 100) == (
        "alice already has 2 pending jobs; the limit is quotas.users.alice.max_pending_jobs=2"
    )
    assert pending_quota_problem(policy, "bob", {"alice": 1, "bob": 2}, 100) == (
        "group vision (of bob) already has 3 pending jobs; the limit is quotas.groups.vision.max_pending_jobs=3"
    )
    assert pending_quota_problem(policy, "dave", {"dave": 5}, 100) == (
        'dave already has 5 pending jobs; the limit is quotas.users."*".max_pending_jobs=5'
    )
    # No quota for the user at all: the flat max_pending_jobs_per_user is the default, 0 no limit.
    assert pending_quota_problem(QuotaPolicy(), "", {"": 4}, 4) == (
        "the anonymous owner already has 4 pending jobs; the limit is max_pending_jobs_per_user=4"
    )
    assert pending_quota_problem(QuotaPolicy(), "eve", {"eve": 10**6}, 0) is None
    # A named user's 0 is "no cap", above a "*" default.
    unlimited = parse_quotas({"users": {"root": {"max_pending_jobs": 0}, "*": {"max_pending_jobs": 1}}}, {})
    assert pending_quota_problem(unlimited, "root", {"root": 99}, 1) is None


async def test_submit_is_refused_with_a_message_naming_the_quota():
    policy = parse_quotas({"groups": {"vision": {"max_pending_jobs": 2}}}, {"vision": ["alice", "bob"]})
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0)
    manager = JobManager(cluster, MemoryJobStore(), quotas=policy, max_pending_jobs_per_user=100)
    await manager.start()
    await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, owner="alice"))
    await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, owner="bob"))
    with pytest.raises(QuotaExceeded, match=r"group vision \(of alice\) already has 2 pending jobs; .*quotas\.groups\.vision"):
        await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, owner="alice"))
    await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, owner="carol"))  # in no group: not held
    assert len(manager.pending) == 3


async def test_the_scheduler_sees_each_job_s_group():
    policy = parse_quotas({}, {"vision": ["alice"]})
    cluster = ClusterView(policy=LivenessPolicy(), default_heartbeat_interval=1.0)
    manager = JobManager(cluster, MemoryJobStore(), quotas=policy)
    await manager.start()
    alice = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, owner="alice"))
    carol = await manager.submit(job_pb2.JobSpec(argv=["train"], gpus=1, owner="carol"))
    assert manager.scheduling.request(manager.get(alice)).group == "vision"
    assert manager.scheduling.request(manager.get(carol)).group == ""
