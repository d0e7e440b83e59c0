"""bench/clients_scaling.py's bookkeeping on fake run folders (no run, no timing): phase
timings read from the run folder, the power-law fit behind the extrapolation, the table
keeping failed configurations visible, and the process-tree sampler."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cs():
    spec = importlib.util.spec_from_file_location("clients_scaling", ROOT / "bench" / "clients_scaling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_run(tmp_path: Path, timings: dict) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "timings.json").write_text(json.dumps(timings))
    return run


def test_read_phases_from_run_folder(cs, tmp_path):
    run = _fake_run(tmp_path, {"federate": 10.0, "collect": 0.5, "distill+evaluate": 4.0, "audit": 2.0,
                               "report": 3.5})
    assert cs.read_timings(run)["report"] == 3.5
    # timings.json's report includes the audit: the phases are made disjoint
    assert cs.read_phases(run) == {"federate": 10.0, "collect": 0.5, "distill+evaluate": 4.0, "audit": 2.0,
                                   "report_rest": 1.5}
    # 'other' is what the wall time spent outside the phases (engine start-up, shut-down)
    assert cs.read_phases(run, wall_s=25.0)["other"] == pytest.approx(7.0)
    assert cs.read_phases(tmp_path / "missing") is None
    (run / "timings.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="phase -> seconds"):
        cs.read_phases(run)


def test_power_law_fit_and_extrapolation(cs):
    a, b = cs.fit_power_law([4, 16, 64], [3.0 * n ** 0.5 for n in (4, 16, 64)])
    assert (a, b) == (pytest.approx(3.0), pytest.approx(0.5))
    assert cs.fit_power_law([4], [1.0]) is None  # one point: no fit
    recs = [{"kind": "clients_scaling", "engine": "simulation", "clients": n, "ok": True, "wall_s": 2.0 * n,
             "phases_s": {"federate": 2.0 * n, "report_rest": 7.0}} for n in (4, 16, 64)]
    recs.append({"kind": "clients_scaling", "engine": "simulation", "clients": 256, "ok": False,
                 "wall_s": 1.0, "phases_s": None, "error": "timed out"})  # failures are not fitted
    ext = cs.extrapolate(recs, n=1000)
    assert ext["federate"]["b"] == pytest.approx(1.0)
    assert ext["federate"]["at_n_s"] == pytest.approx(2000.0)
    assert ext["report_rest"]["b"] == pytest.approx(0.0, abs=1e-9)
    table = cs.markdown_table(recs)
    assert "| simulation | 256 | **no**: timed out |" in table  # a failure stays in the table
    assert "extrapolated" in table and "| federate | 1.00 | 2,000 |" in table


def test_stored_records_are_made_disjoint(cs):
    old = {"kind": "clients_scaling", "wall_s": 30.0,
           "phases_s": {"federate": 10.0, "audit": 5.0, "report": 8.0, "other": 0.0}}
    assert cs._rephase(old)["phases_s"] == {"federate": 10.0, "audit": 5.0, "report_rest": 3.0, "other": 12.0}
    assert cs.fit_linear([4, 16, 64], [100 + 2 * n for n in (4, 16, 64)]) == (pytest.approx(100), pytest.approx(2))


def test_tree_sampler_sees_children(cs):
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(30)"])
    try:
        time.sleep(1.0)
        sampler = cs.TreeSampler([os.getpid()])
        sampler.sample()
        assert child.pid in sampler.hwm
        assert sampler.peak_mib("bytearray") >= 64  # the child's own high-water mark, found by command line
        assert sampler.peak_tree_kib / 1024 > sampler.peak_mib("bytearray") + 10  # this process counted too
    finally:
        child.kill()
        child.wait()
