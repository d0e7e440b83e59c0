"""scenarios/quickstart.sh: exit status with the reason last, and nothing left running or modified."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scenarios" / "quickstart.sh"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _run(*args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "VENV": sys.prefix, "FEDPDD_PROGRESS_EVERY_S": "30"}
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.perf_counter() - t0


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return err[-1] if err else lines[-1]


def _pyproject_digest() -> bytes:
    return (ROOT / "pyproject.toml").read_bytes()


def test_scenario_error_fails_fast_before_anything_starts() -> None:
    before = _pyproject_digest()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import yaml, torch, flwr.common.config"], timeout=300, check=True)
    startup = time.perf_counter() - t0  # one interpreter start with the check's imports, on this machine now
    proc, wall = _run("--run-config", "roundz=3")
    assert proc.returncode == 2
    assert _last_line(proc).startswith("fedpdd check: --run-config: unknown key 'roundz'")
    assert "starting a SuperLink" not in proc.stdout  # stopped at step 1
    assert wall < 3 * startup + 20  # the check only: no SuperLink, no Ray (those take minutes when loaded)
    proc, _ = _run("--run-config", "rounds='x'")
    assert proc.returncode == 2
    assert _last_line(proc).startswith("fedpdd check: --run-config rounds='x': key 'federation.rounds'")
    assert _pyproject_digest() == before


def _superlink_alive(port: str) -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmd and f"--port {port}" in cmd:
            return True
    return False


SMALL = ("rounds=1 iterations=2 eval-epochs=1 num-models=1 methods='dm' output-dir='{out}' "
         "overrides='data.train_limit=400;data.test_limit=100;model.width=8;{extra}'")


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
@pytest.mark.parametrize("case", ["federation", "dataset"])
def test_failing_run_exits_nonzero_with_reason_last_and_stops_everything(case: str, tmp_path: Path) -> None:
    before = _pyproject_digest()
    if case == "federation":  # every client raises in training: fewer than min_clients answer
        cfg = SMALL.format(out=tmp_path / "run", extra="faults.clients=[0,1,2,3];faults.mode=raise;faults.phases=[train]")
        expected = "fedpdd: run FAILED: FederationError"
    else:  # passes the static check, fails in the ServerApp: a dataset with no local copy and download off
        cfg = SMALL.format(out=tmp_path / "run", extra="data.dataset=svhn;data.download=false")
        expected = "fedpdd: run FAILED: DatasetError: dataset 'svhn' not found"
    proc, _ = _run("--run-config", cfg)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert re.match(expected, _last_line(proc)), out[-3000:]
    port = re.search(r"starting a SuperLink on 127\.0\.0\.1:(\d+)", proc.stdout).group(1)
    assert not _superlink_alive(port)
    assert _pyproject_digest() == before
