#!/usr/bin/env bash
# Installs gpuorch with its test dependencies into .venv and runs the whole test suite.
#   scripts/test.sh                 # everything
#   scripts/test.sh -k liveness     # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[dev]'
# Worker processes in the tests use torch with the gloo backend on the CPU. Pinning the
# version takes the CPU wheel where it is provided locally; a bare `pip install torch`
# would pull a multi-gigabyte CUDA build.
python -m pip install -q 'torch==2.13.0' || echo "warning: torch==2.13.0 not installable here; tests that run torch ranks will be skipped" >&2
python -m pytest "$@"
