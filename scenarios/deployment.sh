#!/usr/bin/env bash
# The same app under Flower's Deployment Engine: one SuperLink and N SuperNodes on loopback (each
# SuperNode holds its partition via --node-config), `flwr run` against them, then every process this
# script started is stopped by PID. Usage:
#   bash scenarios/deployment.sh [N] [extra flwr run args, e.g. --run-config "..."]
# Default: 2 SuperNodes, the quickstart cut to a smoke-test budget (runs/deployment/).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2}; shift || true
VENV=${VENV:-.venv}
export PATH="$(cd "$VENV" && pwd)/bin:$PATH"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# A private Flower home, so the user's ~/.flwr connections are untouched.
FLWR_HOME=$(mktemp -d); export FLWR_HOME
LOGS=${LOGS:-runs/deployment/logs}; mkdir -p "$LOGS"
BASE=${BASE_PORT:-19091}  # SuperLink (runtime, fleet and control HTTP APIs) on BASE; SuperNode i on BASE+10+i
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "loopback"

[superlink.loopback]
address = "127.0.0.1:$BASE"
insecure = true
TOML
# flwr run migrates pyproject's [tool.flwr.federations] into FLWR_HOME and comments it out: keep a copy.
cp pyproject.toml "$FLWR_HOME/pyproject.toml.bak"

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  cp "$FLWR_HOME/pyproject.toml.bak" pyproject.toml
  rm -rf "$FLWR_HOME"
}
trap cleanup EXIT

flower-superlink --insecure \
  --host 127.0.0.1 --port "$BASE" > "$LOGS/superlink.log" 2>&1 &
PIDS+=($!)
sleep 3
for ((i = 0; i < N; i++)); do
  flower-supernode --insecure --superlink "127.0.0.1:$BASE" \
    --host 127.0.0.1 --port "$((BASE + 10 + i))" \
    --node-config "partition-id=$i num-partitions=$N" > "$LOGS/supernode-$i.log" 2>&1 &
  PIDS+=($!)
done
sleep 3

DEFAULT_CONFIG="clients=$N rounds=1 iterations=20 eval-epochs=5 num-models=2 methods='dm,random_real' output-dir='runs/deployment' overrides='data.train_limit=2000;data.test_limit=500;federation.min_clients=$N'"
if [ "$#" -eq 0 ]; then set -- --run-config "$DEFAULT_CONFIG"; fi
flwr run . loopback --stream "$@"
