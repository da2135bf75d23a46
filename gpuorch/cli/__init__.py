"""gpuctl: the operator's command line, built on the SDK.

    gpuctl nodes                 every node, one line each
    gpuctl node ID               one node and its GPUs
    gpuctl status                cluster totals
    gpuctl usage [--days N]      GPU-hours by owner and pool, allocation and utilisation over time
    gpuctl drain ID [--reason]   stop placing work on a node
    gpuctl resume ID             open it again
    gpuctl submit --gpus N [...] -- CMD ARGS...    queue a job, print its id
    gpuctl submit --array 0-99%8 [...] -- CMD {index}   a job array: one task per index, at most 8 at once
    gpuctl submit --after JOB[:ok|:fail|:any] [...] -- CMD   start once JOB (or every task of an array) ends so
    gpuctl jobs [--state S] [--owner U] [--tasks] list jobs, newest first (an array is one line unless --tasks)
    gpuctl results ARRAY [--sort F] [-o csv]      a sweep's tasks: state, runtime, reported result fields
    gpuctl job ID                one job with its placement
    gpuctl cancel ID             stop every rank of a job
    gpuctl watch ID              follow a job until it ends (exit 0 only if it succeeded)
    gpuctl resubmit ID           queue the same spec again, print the new id
    gpuctl logs ID [--rank R] [--tail N] [-f]     a rank's output (--tail: lines, --tail-bytes: bytes)
    gpuctl priority ID P         change a pending or running job's priority
    gpuctl token --user U [--role R]              make a new token and its [[tokens]] entry
    gpuctl completion bash|zsh   a shell completion script

Global options (-o json, --coordinator, --token, ...) go before or after the command. The
coordinator address comes from --coordinator, else $GPUORCH_COORDINATOR, else
127.0.0.1:50051 (port 50051 when an address names none); a comma-separated list names several
coordinators, and gpuctl follows their leader. Times are local, with their zone
(--utc for UTC). Everything printed for people has control characters escaped. A coordinator with
tokens wants --token (or $GPUORCH_TOKEN). To any address but loopback gpuctl speaks
TLS, trusting --tls-ca (or $GPUORCH_TLS_CA), else the system's CAs; --insecure (or
$GPUORCH_CLIENT_INSECURE=1) is for a coordinator that serves plaintext on the network.
"""

from gpuorch.cli.commands import main, new_token, run
from gpuorch.cli.completion import completion_script, subcommands
from gpuorch.cli.parser import build_parser, parse_size
from gpuorch.cli.printing import printable
from gpuorch.cli.views import format_job, format_jobs, format_node, format_nodes, format_status

__all__ = [
    "build_parser",
    "completion_script",
    "format_job",
    "format_jobs",
    "format_node",
    "format_nodes",
    "format_status",
    "main",
    "new_token",
    "parse_size",
    "printable",
    "run",
    "subcommands",
]
