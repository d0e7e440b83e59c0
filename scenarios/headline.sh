#!/usr/bin/env bash
# The headline study, resumable: every step skips or resumes what a previous run of it finished.
#   bash scenarios/headline.sh [STEP ...]        # default: every step, in the order below
# Steps (each one a command the README of docs/results/ lists):
#   fed-s0      federate scenarios/core-fed.yaml (seed 0): theta* after 2 rounds, safe pool, validation split
#   tune-s0     the same image-optimizer search for dm, dkkt_dm and dsv on the validation split (scenarios/tune.py)
#   grid-s0-1   the table's ipc-1 cells on theta*(seed 0) with each method's tuned setting, scored on the test split
#   fed-s1      the same federation with seed 1 (its own theta*, partition and safe pool)
#   grid-s1-1   ipc-1 cells on theta*(seed 1)
#   trained-s0  federate scenarios/core-trained.yaml (seed 0) to the validation plateau
#   gridt-s0-1  ipc-1 cells on the plateau theta*
#   grid-s0-10, grid-s1-10, gridt-s0-10   the ipc-10 cells
#   ablate-s0, ablate-t0   dkkt_dm's ablations at ipc 1 and 10, pipc 10 (one folder per variant, the grid's seeds,
#               so each pairs with the grid's dkkt_dm cells): alpha 0, gamma 0, both, no manifold pass, the paper's
#               literal variant, alpha 0.1 / 1 / 10, the inner gradients at theta_0 and along the path
# Environment: VENV (default .venv), NICE (default 5: the study yields the cores to interactive work),
# TUNE_FED_S0 (the federated folder tune-s0 searches on; default runs/core-fed-s0).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="nice -n ${NICE:-5} $VENV/bin/python"
TUNE_METHODS=dm,dkkt_dm,dsv

federate() {  # federate SCENARIO SEED OUT: phases 1-2 (the scenario's whole pool) and random_real at ipc 1 as smoke cells
  if [ -f "$3/global_model.pt" ] && [ -f "$3/safe_pool.pt" ]; then echo "[headline] $3: federated already"; return; fi
  # Each federation is its own set of simulated devices, so each keeps its own release ledger: one study's
  # federation never spends another's safe-image budget (edge_client/policy.py).
  FEDPDD_NODE_STATE="$PWD/runs/.node-state/$(basename "$3")" nice -n "${NICE:-5}" bash scenarios/quickstart.sh --run-config \
    "scenario='$1' seed=$2 output-dir='$3' methods='random_real' ipc='1'"
}

settings() {  # the tuned picks as one JSON object (dsv_real takes dsv's pick: the same loss, another start)
  $PY - "$1" <<'PY'
import json, sys, yaml
picks = yaml.safe_load(open(sys.argv[1] + "/method_settings.yaml")) or {}
if "dsv" in picks:
    picks.setdefault("dsv_real", picks["dsv"])
print(json.dumps(picks, sort_keys=True))
PY
}

grid() {  # grid SCENARIO FED TUNING IPC
  $PY -m server.pipeline "$1" --reuse "$2" --output-dir "$2" --cells "ipc=$4" \
    --set "distill.method_settings=$(settings "$3")"
}

ablate() {  # ablate SCENARIO FED TUNING: one run folder per variant under FED-ablation/
  local variants=("alpha0:distill.alpha=0" "gamma0:distill.gamma=0" "primal-only:distill.alpha=0;distill.gamma=0"
                  "no-manifold:distill.aug_weight=0" "paper:distill.stat_variant=paper" "alpha0.1:distill.alpha=0.1"
                  "alpha1:distill.alpha=1" "alpha10:distill.alpha=10" "stat-theta0:distill.stat_at=theta0"
                  "stat-path:distill.stat_at=path")
  for v in "${variants[@]}"; do
    local name=${v%%:*} sets=() item
    IFS=';' read -ra items <<< "${v#*:}"
    for item in "${items[@]}"; do sets+=(--set "$item"); done
    $PY -m server.pipeline "$1" --reuse "$2" --output-dir "$2-ablation/$name" --set "name=$(basename "$2")-$name" \
      --set "distill.methods=[dkkt_dm]" --set "distill.pipc=[10]" --set "distill.ipc=[1, 10]" \
      --set "distill.method_settings=$(settings "$3")" "${sets[@]}"
  done
}

tune() {  # tune SCENARIO FED OUT
  $PY scenarios/tune.py --scenario "$1" --fed "$2" --out "$3" --methods "$TUNE_METHODS"
}

run_step() {
  echo "[headline] $(date -u +%H:%M:%S) step $1"
  case "$1" in
    fed-s0) federate scenarios/core-fed.yaml 0 runs/core-fed-s0 ;;
    tune-s0) tune scenarios/core-fed.yaml "${TUNE_FED_S0:-runs/core-fed-s0}" runs/core-fed-s0-tuning ;;
    grid-s0-1) grid scenarios/core-fed.yaml runs/core-fed-s0 runs/core-fed-s0-tuning 1 ;;
    grid-s0-10) grid scenarios/core-fed.yaml runs/core-fed-s0 runs/core-fed-s0-tuning 10 ;;
    fed-s1) federate scenarios/core-fed.yaml 1 runs/core-fed-s1 ;;
    grid-s1-1) grid scenarios/core-fed.yaml runs/core-fed-s1 runs/core-fed-s0-tuning 1 ;;
    grid-s1-10) grid scenarios/core-fed.yaml runs/core-fed-s1 runs/core-fed-s0-tuning 10 ;;
    trained-s0) federate scenarios/core-trained.yaml 0 runs/core-trained-s0 ;;
    tune-t0) tune scenarios/core-trained.yaml runs/core-trained-s0 runs/core-trained-s0-tuning ;;
    gridt-s0-1) grid scenarios/core-trained.yaml runs/core-trained-s0 runs/core-trained-s0-tuning 1 ;;
    gridt-s0-10) grid scenarios/core-trained.yaml runs/core-trained-s0 runs/core-trained-s0-tuning 10 ;;
    ablate-s0) ablate scenarios/core-fed.yaml runs/core-fed-s0 runs/core-fed-s0-tuning ;;
    ablate-t0) ablate scenarios/core-trained.yaml runs/core-trained-s0 runs/core-trained-s0-tuning ;;
    *) echo "[headline] unknown step '$1'" >&2; exit 2 ;;
  esac
}

STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(fed-s0 tune-s0 grid-s0-1 fed-s1 grid-s1-1 trained-s0 tune-t0 gridt-s0-1
                                   grid-s0-10 grid-s1-10 gridt-s0-10 ablate-s0 ablate-t0)
for step in "${STEPS[@]}"; do run_step "$step"; done
echo "[headline] $(date -u +%H:%M:%S) done: ${STEPS[*]}"
