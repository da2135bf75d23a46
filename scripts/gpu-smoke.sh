#!/usr/bin/env bash
# On a GPU node: checks the path a real node takes, end to end, on loopback. A coordinator
# and an agent that reads the real GPUs through NVML; the node's inventory and telemetry
# as gpuctl and Prometheus see them; then an NCCL all-reduce job over every GPU, launched
# through the agent (examples/allreduce.py needs torch with CUDA). Exits non-zero if any
# step fails. gpuorch must be importable by `python3` (pip install ., or PYTHONPATH).
#   scripts/gpu-smoke.sh                # the job runs as root (--allow-root-ranks)
#   OWNER=alice scripts/gpu-smoke.sh    # as root: the agent starts the ranks as alice
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STATE=$(mktemp -d /tmp/gpuorch-smoke.XXXXXX)
chmod 0755 "$STATE"  # ranks of another owner must reach their working directory in it
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
METRICS_PORT=$(free_port)
NODE=$(hostname)
export GPUORCH_COORDINATOR=127.0.0.1:$PORT
gpuctl() { "$PYTHON" -m gpuorch.cli "$@"; }

cleanup() {
  kill "$AGENT_PID" "$COORDINATOR_PID" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

"$PYTHON" -m coordinator.main --listen "127.0.0.1:$PORT" --state-dir "$STATE/coordinator" \
  --metrics-listen "127.0.0.1:$METRICS_PORT" --log-format json >"$STATE/coordinator.log" 2>&1 &
COORDINATOR_PID=$!
"$PYTHON" -m agent.main --coordinator "127.0.0.1:$PORT" --node-id "$NODE" --state-dir "$STATE/agent" \
  --allow-root-ranks --log-format json >"$STATE/agent.log" 2>&1 &
AGENT_PID=$!

for _ in $(seq 100); do
  gpuctl -o json nodes 2>/dev/null | grep -q '"NODE_STATE_READY"' && break
  sleep 0.2
done
if ! gpuctl -o json nodes 2>/dev/null | grep -q '"NODE_STATE_READY"'; then
  echo "gpu-smoke: the node never became READY; agent log:" >&2
  tail -20 "$STATE/agent.log" >&2
  exit 1
fi
sleep 2  # a couple of heartbeats, so telemetry shows
echo "== gpuctl node $NODE"
gpuctl node "$NODE"
GPUS=$("$PYTHON" -c 'import pynvml; pynvml.nvmlInit(); print(pynvml.nvmlDeviceGetCount())')

echo "== Prometheus (dcgm-exporter names)"
"$PYTHON" - "$METRICS_PORT" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
lines = [line for line in text.splitlines() if line.startswith("DCGM_FI_DEV_")]
print("\n".join(lines[:12]))
sys.exit(0 if lines else "no DCGM_FI_DEV_* series")
EOF

echo "== NCCL all-reduce over $GPUS GPU(s)${OWNER:+ as $OWNER}"
JOB=$(gpuctl submit --gpus "$GPUS" --backend nccl --name gpu-smoke --max-restarts 0 ${OWNER:+--owner "$OWNER"} \
  -- "$(command -v "$PYTHON")" "$PWD/examples/allreduce.py")
gpuctl watch "$JOB" || { gpuctl job "$JOB"; tail -20 "$STATE/agent.log"; exit 1; }
for rank in $(seq 0 $((GPUS - 1))); do
  gpuctl logs "$JOB" --rank "$rank"
done
gpuctl logs "$JOB" --rank 0 | grep -q "backend nccl device cuda:0: all_reduce ok"
echo "gpu-smoke: ok (state and logs in $STATE)"
