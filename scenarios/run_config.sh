# Sourced by quickstart.sh and deployment.sh: collect_run_config "$@" fills the array RUN_CONFIG with
# the --run-config arguments among "$@" (for `python -m server.check`; flwr run gets "$@" unchanged).
collect_run_config() {
  RUN_CONFIG=()
  local args=("$@") i
  for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
      --run-config|-c) RUN_CONFIG+=(--run-config "${args[i + 1]:-}"); i=$((i + 1)) ;;
      --run-config=*) RUN_CONFIG+=(--run-config "${args[i]#--run-config=}") ;;
    esac
  done
}
