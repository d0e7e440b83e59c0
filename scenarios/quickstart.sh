#!/usr/bin/env bash
# One command for a fresh machine: set up the venv (first time only), check the scenario, run it
# offline as a local simulation and exit non-zero, with the reason last, when anything fails.
#   bash scenarios/quickstart.sh                                  # scenarios/quickstart.yaml, 4 clients
#   bash scenarios/quickstart.sh --run-config "rounds=3 methods='dm,dkkt_dm'"
#   CLIENTS=8 bash scenarios/quickstart.sh --run-config "clients=8"
# Extra arguments go to `flwr run`. Environment: VENV (default .venv), CLIENTS (SuperNodes, default
# 4), SUPERLINK_WAIT (seconds to wait for the SuperLink to come up, default 120).
#
# What it does, and why:
#  1. `python -m server.check`: the scenario + --run-config + federation size, in about a second,
#     before anything starts (errors name the key, the value and where it came from).
#  2. A private Flower home (FLWR_HOME) with its own connection, so ~/.flwr and pyproject.toml are
#     left alone, and a SuperLink on free ports that this script starts and waits for (a slow start
#     is not a failure; another user's SuperLink is never reused).
#  3. `flwr run . local --stream` with runtime dependency installation off (offline, no `uv sync`).
#  4. `flwr run` exits 0 even when the app fails: the ServerApp writes its outcome to
#     $FEDPDD_STATUS_FILE and `python -m server.check --status` turns it into the exit status.
#  5. Everything it started is stopped by PID on exit, also on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-.venv}
CLIENTS=${CLIENTS:-4}
SUPERLINK_WAIT=${SUPERLINK_WAIT:-120}
T_START=$(date +%s)

if [ ! -x "$VENV/bin/flwr" ]; then
  echo "[setup] creating $VENV and installing fedpdd (one time)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  else  # no NVIDIA GPU: the CPU build (about 1 GB instead of 5.5 GB of CUDA libraries)
    "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1 \
      --index-url https://download.pytorch.org/whl/cpu
  fi
  "$VENV/bin/python" -m pip install -q -e ".[test]"
fi
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${FEDPDD_DATA_ROOT:-}" ]; then
  SUDO=$( [ "$(id -u)" -eq 0 ] && echo "" || echo "sudo " )
  echo "[setup] Fashion-MNIST not found: run '${SUDO}apt-get update && ${SUDO}apt-get install -y" \
       "dataset-fashion-mnist', or export FEDPDD_DATA_ROOT=/path/to/idx/files (the simulated devices' data)" \
       "and pass --run-config \"data-root='/path/to/idx/files'\" (the server's)" >&2
fi
# shellcheck source=run_config.sh
source "$ROOT/scenarios/run_config.sh"
use_checkout "$VENV"
check_run "$CLIENTS" "$@"

FLWR_HOME=$(mktemp -d -t fedpdd-flwr-XXXXXX); export FLWR_HOME
export FEDPDD_STATUS_FILE="$FLWR_HOME/status.json"
SUPERLINK_PGID=""
cleanup() {
  local rc=$?
  if [ -n "$SUPERLINK_PGID" ]; then  # the SuperLink and the simulation processes it spawned
    kill -TERM -- "-$SUPERLINK_PGID" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 -- "-$SUPERLINK_PGID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$SUPERLINK_PGID" 2>/dev/null || true
  fi
  if [ "$rc" -ne 0 ] && [ -f "$FLWR_HOME/superlink.log" ]; then
    mkdir -p runs && cp "$FLWR_HOME/superlink.log" runs/last-superlink.log  # for a post-mortem (README)
  fi
  rm -rf "$FLWR_HOME"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r PORT CONTROL_PORT < <(python - <<'PY'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=$PORT FLWR_LOCAL_CONTROL_API_PORT=$CONTROL_PORT
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local"

[superlink.local]
address = ":local:"
TOML

echo "[2/3] starting a SuperLink on 127.0.0.1:$PORT (private FLWR_HOME, waiting up to ${SUPERLINK_WAIT}s)"
# the command `flwr run` would use for its managed local SuperLink, in a process group of its own
setsid flower-superlink --insecure --simulation --isolation subprocess \
  --control-api-address "127.0.0.1:$CONTROL_PORT" --host 127.0.0.1 --port "$PORT" \
  --database "$FLWR_HOME/state.db" --log-file "$FLWR_HOME/superlink.log" > /dev/null 2>&1 &
SUPERLINK_PGID=$!
python - "$PORT" "$SUPERLINK_WAIT" "$SUPERLINK_PGID" <<'PY'
import os, sys, time, urllib.request
port, wait, pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + wait
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"quickstart: the SuperLink exited during start-up (see its log)")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(f"quickstart: the SuperLink did not answer on 127.0.0.1:{port} within {wait:.0f}s "
         "(a very busy machine? raise SUPERLINK_WAIT)")
PY

echo "[3/3] flwr run . local --stream ($CLIENTS SuperNodes, one CPU per client actor)"
flwr run . local --stream \
  --federation-config "num-supernodes=$CLIENTS client-resources-num-cpus=1 client-resources-num-gpus=0.0" "$@"
T_END=$(date +%s)
echo "quickstart: wall time $((T_END - T_START))s (check, SuperLink start, run); SuperLink log of a failed run: runs/last-superlink.log"
python -m server.check --status "$FEDPDD_STATUS_FILE"  # last line: the outcome; exit 1 when the run failed
