#!/usr/bin/env bash
# Installs gpuorch with its test dependencies into .venv, checks lint, format and types, and runs
# the whole test suite. Any finding of ruff or mypy fails the script before the tests run.
#   scripts/test.sh                 # everything
#   scripts/test.sh -k liveness     # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PIP_LOG=$(mktemp)
trap 'rm -f "$PIP_LOG"' EXIT
# Says what a step does (pip, apt-get); its own output goes to a log, shown only if the step fails.
quietly() {
  local what=$1
  shift
  echo "$what..."
  if ! "$@" >"$PIP_LOG" 2>&1; then
    cat "$PIP_LOG" >&2
    echo "failed: $what (the output above is the step's)" >&2
    return 1
  fi
}
# The store tests run a real PostgreSQL server (tests/postgres_server.py starts its own cluster in a temp dir, on
# its own port): install Debian's server package when it is missing. Its own "main" cluster is not created, and
# would not matter if it were.
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  quietly "installing postgresql-common (apt-get), to turn off the package's own cluster" \
    sh -c "${as_root[*]} apt-get update -q && ${as_root[*]} apt-get install -y -q postgresql-common"
  if [ -f /etc/postgresql-common/createcluster.conf ]; then
    "${as_root[@]}" sed -i 's/^#\?create_main_cluster.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf
  fi
  quietly "installing PostgreSQL for the store tests (apt-get install postgresql)" "${as_root[@]}" apt-get install -y -q postgresql
fi
python3 -m venv .venv
. .venv/bin/activate
quietly "upgrading pip in .venv" python -m pip install -q --upgrade pip
quietly "installing gpuorch and its test dependencies into .venv (about a minute)" python -m pip install -q -e '.[dev]'
# Worker processes in the tests use torch with the gloo backend on the CPU. Pinning the
# version takes the CPU wheel where it is provided locally; a bare `pip install torch`
# would pull a multi-gigabyte CUDA build.
quietly "installing torch 2.13.0 (CPU) for the tests' ranks (a minute or two the first time)" python -m pip install -q 'torch==2.13.0' ||
  echo "warning: torch==2.13.0 not installable here; tests that run torch ranks will be skipped" >&2
# The dashboard's browser tests drive Debian's chromium through Playwright (Playwright's own browser
# download needs the internet; it is never used).
if [ ! -x /usr/bin/chromium ]; then
  echo "installing chromium for the dashboard's browser tests (apt-get)..."
  if [ "$(id -u)" -eq 0 ]; then apt_get="apt-get"; else apt_get="sudo apt-get"; fi
  $apt_get install -y -q chromium >"$PIP_LOG" 2>&1 || { $apt_get update -q >/dev/null 2>&1 && $apt_get install -y -q chromium >"$PIP_LOG" 2>&1; } ||
    { cat "$PIP_LOG" >&2; echo "warning: chromium not installable; the browser tests will be skipped" >&2; }
fi
# Says what a check does and runs it, its findings shown as they come; any finding stops the script.
check() {
  local what=$1
  shift
  echo "$what..."
  if ! "$@"; then
    echo "failed: $what (the findings above; \`ruff check --fix\` and \`ruff format\` fix many by themselves)" >&2
    return 1
  fi
}
check "ruff check: the lint rules of pyproject.toml, whole tree" ruff check .
check "ruff format --check: every file as ruff format leaves it" ruff format --check .
check "mypy: the types of coordinator, agent and gpuorch" mypy coordinator agent gpuorch
echo "running the tests..."
python -m pytest "$@"
