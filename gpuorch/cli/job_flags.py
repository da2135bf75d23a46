"""The flags of gpuctl submit and run for what happens inside a job: stragglers, idleness, GPU memory."""

from __future__ import annotations

import argparse

from gpuorch.wire_values import STRAGGLER_ACTIONS, straggler_action


def add_telemetry_flags(parser: argparse.ArgumentParser) -> None:
    """What a job does about stragglers, idleness and GPU memory (gpuctl submit and run)."""
    parser.add_argument(
        "--on-straggler", choices=tuple(STRAGGLER_ACTIONS), default="flag",
        help="a rank much slower than its peers: flag it on the job (default), or restart the attempt without its GPU",
    )  # fmt: skip
    parser.add_argument(
        "--idle-timeout", type=float, default=0.0, metavar="MINUTES",
        help="cancel the job (reason idle) once its GPUs stayed idle this long (default: the pool's, if any)",
    )  # fmt: skip
    parser.add_argument("--idle-exempt", action="store_true", help="never flag or stop it as idle (a job that waits on a person)")
    parser.add_argument(
        "--gpu-memory-fraction", type=float, default=0.0, metavar="F",
        help="share of each GPU's memory a rank may allocate, in (0, 1] (applied by gpuorch.worker; default: all)",
    )  # fmt: skip


def telemetry_fields(args: argparse.Namespace) -> dict:
    """The JobSpec fields of add_telemetry_flags' flags."""
    return {
        "on_straggler": straggler_action(args.on_straggler),
        "idle_timeout_minutes": args.idle_timeout,
        "idle_exempt": args.idle_exempt,
        "gpu_memory_fraction": args.gpu_memory_fraction,
    }
