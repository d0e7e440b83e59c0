#!/usr/bin/env bash
# Run every benchmark; one JSON line per measurement, collected in bench/results/<UTC time>.jsonl.
#   bash bench/run_all.sh                 # all but the quickstart end to end (about 5 min on 2 quiet cores, ~15 when loaded)
#   bash bench/run_all.sh --e2e           # plus bench/quickstart_e2e.py (several more minutes)
#   bash bench/run_all.sh --quick         # tiny sizes: a smoke run of every script (about 20 s)
#   bash bench/run_all.sh --device cuda   # any other flag goes to every script (--repeats, --threads, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-/work/venv/bin/python}
[ -x "$PY" ] || PY=python3
e2e=0
args=()
for a in "$@"; do
  if [ "$a" = "--e2e" ]; then e2e=1; else args+=("$a"); fi
done
mkdir -p bench/results
out="bench/results/$(date -u +%Y%m%dT%H%M%SZ).jsonl"
scripts=(distill_step eval_epoch client_epoch threads fast_paths)
[ "$e2e" = 1 ] && scripts+=(quickstart_e2e)
for s in "${scripts[@]}"; do
  echo "== bench/$s.py ${args[*]:-}" >&2
  start=$(date +%s)
  "$PY" "bench/$s.py" "${args[@]}" | tee -a "$out"
  echo "== bench/$s.py took $(( $(date +%s) - start )) s" >&2
done
echo "results: $out" >&2
