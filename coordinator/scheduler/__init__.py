"""The scheduler: which pending jobs start now, and on which GPUs.

Pure decisions over plain data (STYLE.md #4): frozen dataclasses in, frozen
dataclasses out, time injected as `now`, no I/O. The scheduling loop (coordinator/control/scheduling_loop.py) builds a
`NodeView` per node and a `JobRequest` per pending job from its cluster view
each pass, calls `schedule`, and applies the `Decision`s; a simulator can
replay traces through the same function.

One pass:

1. Order the pending jobs by the policy (`order_jobs`): priority, fcfs, sjf (aged), fair_share
   or las (least attained service); srtf for the simulator's oracle reference.
2. Walk them in that order, placing each all-or-nothing against the free
   capacity left by the jobs before it (`place` for one job alone). Eligible
   GPUs: on a schedulable node, healthy, free, with at least the job's memory
   and of its model. Placement packs onto as few nodes as possible with best
   fit (the node whose free count leaves the least over), so that whole nodes
   stay whole for large jobs; `gpus_per_node` fixes the shape; `spread` uses
   as many nodes as it can, evenly. On each node the best-scored GPUs
   (`score_gpu`: free memory, idleness, coolness) are taken, then given local
   ranks by index. A job over its owner's or group's quota waits (quotas.py).
3. EASY backfill (timeline.py): in each pool the first job in order that does not fit now but
   could fit the pool reserves the nodes where it is estimated to start soonest, given the
   running jobs' estimated ends, and keeps last pass's nodes unless others are strictly
   earlier. Later jobs use reserved GPUs only if predicted to end before that start.
4. Preemption (preemption.py): a blocked job that outranks running preemptible jobs (priority
   rules, or las/srtf) gets the victims that free its shape losing the fewest GPU-seconds.

Every job not placed gets a one-line reason for operators.

Imports nothing outside this package: types.py (the records), ordering.py (policies, fair-share
usage, GPU scores), capacity.py (pools and gang placement), reasons.py (why a job waits),
timeline.py (estimated ends, reservations), preemption.py (victims), quotas.py (running-GPU caps),
placement.py (the pass, one job alone, elastic sizes).
"""

from coordinator.scheduler.capacity import _Pass, _Pool
from coordinator.scheduler.ordering import decayed_usage, order_jobs, score_gpu
from coordinator.scheduler.placement import elastic_sizes, place, schedule
from coordinator.scheduler.reasons import request_of_spec, too_big_for_cluster
from coordinator.scheduler.timeline import estimated_start
from coordinator.scheduler.types import (
    POLICIES,
    SIMULATOR_POLICIES,
    Decision,
    GpuView,
    JobRequest,
    NodeShare,
    NodeView,
    Preemption,
    PreemptionRule,
    Quotas,
    Reservation,
    RunningJob,
    SchedulerConfig,
    SchedulingResult,
)

__all__ = [
    "POLICIES",
    "SIMULATOR_POLICIES",
    "Decision",
    "GpuView",
    "JobRequest",
    "NodeShare",
    "NodeView",
    "Preemption",
    "PreemptionRule",
    "Quotas",
    "Reservation",
    "RunningJob",
    "SchedulerConfig",
    "SchedulingResult",
    "_Pass",
    "_Pool",
    "decayed_usage",
    "elastic_sizes",
    "estimated_start",
    "order_jobs",
    "place",
    "request_of_spec",
    "schedule",
    "score_gpu",
    "too_big_for_cluster",
]
