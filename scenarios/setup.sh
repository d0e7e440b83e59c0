# Sourced by quickstart.sh: the one-time set-up of a bare machine (venv, torch, Fashion-MNIST).
# Every function prints what it chose and why, so a log says which index and which data source were used.
#
# Environment:
#   TORCH_CPU_INDEX  the PyTorch CPU wheel index (default https://download.pytorch.org/whl/cpu)
#   INDEX_PROBE_S    seconds the CPU index gets to answer before the default index is used (default 5)
#   FMNIST_DIR       where Debian's dataset-fashion-mnist puts the files (default /usr/share/datasets/fashion-mnist)

TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
INDEX_PROBE_S=${INDEX_PROBE_S:-5}
FMNIST_DIR=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

# index_answers URL SECONDS: exit 0 when URL/torch/ returns HTTP 200 within SECONDS in total (connect, headers
# and body; a server that accepts the connection and then stalls counts as not answering).
index_answers() {
  python3 - "$1" "$2" <<'PY'
import signal, sys, urllib.request
url, limit = sys.argv[1].rstrip("/") + "/torch/", float(sys.argv[2])
signal.signal(signal.SIGALRM, lambda *_: sys.exit(1))
signal.setitimer(signal.ITIMER_REAL, limit)  # one deadline for the whole request, not per socket operation
try:
    with urllib.request.urlopen(url, timeout=limit) as r:
        r.read(1024)
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

# pick_torch_index: prints "cpu" when there is no NVIDIA GPU and the CPU wheel index answers within
# INDEX_PROBE_S seconds, else "default" (the package registry pip is configured for). The reason goes to stderr.
pick_torch_index() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] nvidia-smi found: torch with CUDA from the default index" >&2
    echo default
  elif index_answers "$TORCH_CPU_INDEX" "$INDEX_PROBE_S"; then
    echo "[setup] no NVIDIA GPU and $TORCH_CPU_INDEX answered: the CPU build of torch (about 1 GB)" >&2
    echo cpu
  else
    echo "[setup] $TORCH_CPU_INDEX did not answer within ${INDEX_PROBE_S}s: torch from the default index" \
         "(the CUDA build, about 5.5 GB; it runs on the CPU too)" >&2
    echo default
  fi
}

# install_torch PYTHON: the pinned torch + torchvision from the index pick_torch_index chooses; when the CPU
# index answered the probe but the install from it fails, the default index is tried once more.
install_torch() {
  local py=$1 index
  index=$(pick_torch_index)
  if [ "$index" = cpu ]; then
    if "$py" -m pip install -q --timeout 15 --retries 1 "${TORCH_PINS[@]}" --index-url "$TORCH_CPU_INDEX"; then
      echo "[setup] torch installed from $TORCH_CPU_INDEX"
      return 0
    fi
    echo "[setup] installing from $TORCH_CPU_INDEX failed: falling back to the default index" >&2
  fi
  "$py" -m pip install -q "${TORCH_PINS[@]}"
  echo "[setup] torch installed from the default index"
}

# setup_venv VENV: create VENV and install fedpdd into it, unless it already has `flwr`.
setup_venv() {
  local venv=$1
  if [ -x "$venv/bin/flwr" ]; then
    return 0
  fi
  echo "[setup] creating $venv and installing fedpdd (one time)"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  install_torch "$venv/bin/python"
  "$venv/bin/python" -m pip install -q -e ".[test]"
}

# can_run_apt: 0 when apt-get can install packages: as root, or with passwordless sudo (never prompts).
APT_SUDO=""
can_run_apt() {
  command -v apt-get >/dev/null 2>&1 || return 1
  if [ "$(id -u)" -eq 0 ]; then
    APT_SUDO=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    APT_SUDO="sudo -n"
  else
    return 1
  fi
}

# ensure_fashion_mnist: Debian's Fashion-MNIST in FMNIST_DIR, installed with apt when this user may run it;
# otherwise exit 2 at once (the user must act, as for a bad setting) with the one command to run: a run without
# the data would fail minutes later.
ensure_fashion_mnist() {
  if [ -d "$FMNIST_DIR" ]; then
    return 0
  fi
  if can_run_apt; then
    echo "[setup] Fashion-MNIST not found: installing Debian's dataset-fashion-mnist with apt-get"
    $APT_SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $APT_SUDO apt-get install -y -qq dataset-fashion-mnist
    [ -d "$FMNIST_DIR" ] && return 0
    echo "quickstart: apt-get installed dataset-fashion-mnist but $FMNIST_DIR is still missing" >&2
    exit 2
  fi
  echo "quickstart: Fashion-MNIST is missing ($FMNIST_DIR) and this user may not run apt-get; run" \
       "'sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist', or export" \
       "FEDPDD_DATA_ROOT=/path/to/idx/files (the simulated devices' data) and pass" \
       "--run-config \"data-root='/path/to/idx/files'\" (the server's)" >&2
  exit 2
}
