# Sourced by quickstart.sh and deployment.sh (after they set ROOT), for the steps both take before Flower starts.

# use_checkout VENV: the venv's commands, this checkout's code (whatever the venv's editable install points
# at), and offline: no `uv sync` into ~/.flwr/runtime-envs.
use_checkout() {
  export PATH="$(cd "$1" && pwd)/bin:$PATH"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
}

# check_run N "$@": step 1, `python -m server.check` on the scenario, the --run-config arguments among "$@"
# and a federation of N SuperNodes; a bad key or value stops the script (exit 2) before anything starts.
check_run() {
  local n=$1
  shift
  collect_run_config "$@"
  echo "[1/3] checking the scenario and run-config"
  python -m server.check --num-supernodes "$n" "${RUN_CONFIG[@]}"
}

# collect_run_config "$@" fills the array RUN_CONFIG with the --run-config arguments among "$@"
# (for `python -m server.check`) and OTHER_ARGS with the rest (flwr run gets "$@" unchanged).
collect_run_config() {
  RUN_CONFIG=()
  OTHER_ARGS=()
  local args=("$@") i
  for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
      --run-config|-c) RUN_CONFIG+=(--run-config "${args[i + 1]:-}"); i=$((i + 1)) ;;
      --run-config=*) RUN_CONFIG+=(--run-config "${args[i]#--run-config=}") ;;
      *) OTHER_ARGS+=("${args[i]}") ;;
    esac
  done
}
