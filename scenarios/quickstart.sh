#!/usr/bin/env bash
# One command for a fresh machine: set up the venv (first time only) and run a scenario offline
# through `flwr run .` (local simulation). Extra arguments go to `flwr run`, e.g.
#   bash scenarios/quickstart.sh --run-config "scenario='scenarios/fmnist-table1.yaml'"
# flwr starts a local flower-superlink that outlives the run; this script stops the ones it started.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/flwr" ]; then
  echo "[setup] creating $VENV and installing fedpdd (one time)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/python" -m pip install -q -e ".[test]"
fi
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${FEDPDD_DATA_ROOT:-}" ]; then
  echo "[setup] Fashion-MNIST not found: run 'sudo apt-get install dataset-fashion-mnist'," \
       "or pass --run-config \"data-root='/path/to/idx/files'\"" >&2
fi
export PATH="$(cd "$VENV" && pwd)/bin:$PATH"
# Offline: flwr 1.41 would otherwise try to `uv sync` the app's dependencies into a fresh env.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

before=$(pgrep -f flower-superlink || true)
cleanup() {
  for pid in $(pgrep -f flower-superlink || true); do
    if ! grep -qx "$pid" <<<"$before"; then kill "$pid" 2>/dev/null || true; fi
  done
}
trap cleanup EXIT
flwr run . --stream "$@"
