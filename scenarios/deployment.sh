#!/usr/bin/env bash
# The same app under Flower's Deployment Engine: one SuperLink and N SuperNodes on loopback (each
# SuperNode holds its partition via --node-config), `flwr run` against them, then every process this
# script started is stopped by PID. Usage:
#   bash scenarios/deployment.sh [N] [extra flwr run args, e.g. --run-config "..."]
# Default: 2 SuperNodes, the quickstart cut to a smoke-test budget (runs/deployment/); a --run-config you
# pass is merged into that default run-config, not put in its place.
# Exits non-zero, with the one-line reason last, when the check, the start-up or the run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
N=${1:-2}; shift || true
VENV=${VENV:-.venv}
WAIT=${SUPERLINK_WAIT:-120}
T_START=$(date +%s)
# shellcheck source=run_config.sh
source "$ROOT/scenarios/run_config.sh"
use_checkout "$VENV"

DEFAULT_CONFIG="clients=$N rounds=1 iterations=20 eval-epochs=5 num-models=2 methods='dm,random_real' output-dir='runs/deployment' overrides='data.train_limit=2000;data.test_limit=500;federation.min_clients=$N;privacy.audit_reference=100'"
# Your --run-config goes on top of DEFAULT_CONFIG: a key you give replaces the default's, and your overrides=
# items are added to the default's (yours win for the same scenario key).
collect_run_config "$@"
MERGED=$(python -m server.check --print-run-config --run-config "$DEFAULT_CONFIG" "${RUN_CONFIG[@]}")
set -- --run-config "$MERGED" ${OTHER_ARGS[@]+"${OTHER_ARGS[@]}"}
check_run "$N" "$@"

# A private Flower home, so the user's ~/.flwr connections are untouched.
FLWR_HOME=$(mktemp -d -t fedpdd-flwr-XXXXXX); export FLWR_HOME
export FEDPDD_STATUS_FILE="$FLWR_HOME/status.json"
LOGS=${LOGS:-runs/deployment/logs}; mkdir -p "$LOGS"
BASE=${BASE_PORT:-19091}  # SuperLink (runtime, fleet and control HTTP APIs) on BASE; SuperNode i on BASE+10+i
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "loopback"

[superlink.loopback]
address = "127.0.0.1:$BASE"
insecure = true
TOML

PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$FLWR_HOME"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "[2/3] SuperLink on 127.0.0.1:$BASE and $N SuperNodes (logs in $LOGS/)"
setsid flower-superlink --insecure --host 127.0.0.1 --port "$BASE" > "$LOGS/superlink.log" 2>&1 &
PIDS+=($!)
# Wait for the SuperLink instead of a fixed sleep: a slow start on a busy machine is not a failure.
python - "$BASE" "$WAIT" <<'PY'
import sys, time, urllib.request
port, wait = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + wait
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit(f"deployment: the SuperLink did not answer on 127.0.0.1:{port} within {wait:.0f}s (raise SUPERLINK_WAIT)")
PY
for ((i = 0; i < N; i++)); do
  setsid flower-supernode --insecure --superlink "127.0.0.1:$BASE" \
    --host 127.0.0.1 --port "$((BASE + 10 + i))" \
    --node-config "partition-id=$i num-partitions=$N" > "$LOGS/supernode-$i.log" 2>&1 &
  PIDS+=($!)
done
# The ServerApp itself waits for the N SuperNodes to register (server.federation.federate.wait_for_nodes).

echo "[3/3] flwr run . loopback --stream"
flwr run . loopback --stream "$@"
echo "deployment: wall time $(( $(date +%s) - T_START ))s"
python -m server.check --status "$FEDPDD_STATUS_FILE"
