"""What a new user meets first: "did you mean" for a typo'd key, a run-config token without '=' refused,
the grid's CPU-time estimate, deployment.sh's --run-config merged into its own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.scenario import ScenarioError, load_scenario, estimate_resources
from server.check import format_run_config, merge_run_configs, parse_run_config, resolve

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.check", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def test_unknown_run_config_key_suggests_the_closest() -> None:
    with pytest.raises(ScenarioError, match=r"unknown key 'roundz' \(value 3\) \(did you mean 'rounds'\?\)"):
        parse_run_config(["roundz=3"])
    with pytest.raises(ScenarioError) as err:  # nothing close: no suggestion
        parse_run_config(["zzzzzz=3"])
    assert "did you mean" not in str(err.value)


def test_unknown_scenario_key_suggests_the_closest_in_file_and_overrides(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"unknown key 'distill.iteratons' \(did you mean 'iterations'\?\)"):
        resolve(parse_run_config(["overrides='distill.iteratons=5'"]))
    with pytest.raises(ScenarioError, match=r"unknown key 'federaton' \(did you mean 'federation'\?\)"):
        resolve(parse_run_config(["overrides='federaton.rounds=5'"]))
    bad = tmp_path / "s.yaml"  # the ServerApp's path (load_scenario) gives the same hint for a YAML typo
    bad.write_text("name: x\nfederation:\n  num_clents: 4\n")
    with pytest.raises(ScenarioError, match=r"unknown key 'federation.num_clents' \(did you mean 'num_clients'\?\)"):
        load_scenario(bad)


def test_token_without_equals_is_an_error_not_dropped() -> None:
    with pytest.raises(ScenarioError) as err:
        parse_run_config(["rounds=3 ipc"])
    msg = str(err.value)
    assert "'ipc' is not key=value" in msg and "ipc=VALUE" in msg
    assert parse_run_config(["rounds=3 methods='dm,dkkt_dm' overrides='a.b=1;c=2'"]) == {
        "rounds": 3, "methods": "dm,dkkt_dm", "overrides": "a.b=1;c=2"}


def test_cli_errors_are_one_line_without_traceback() -> None:
    for args in (["--run-config", "roundz=3"], ["--run-config", "rounds=3 ipc"],
                 ["--run-config", "overrides='distill.iteratons=5'"]):
        proc = _cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_check_prints_the_grids_estimated_cpu_time() -> None:
    proc = _cli("--run-config", "scenario='scenarios/fmnist-table1.yaml'")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("fedpdd check: 60 grid cells, estimated distill + evaluate CPU time about "), line
    assert " h on one core" in line


def test_estimate_uses_each_methods_measured_iteration_cost_and_skips_methods_without_steps() -> None:
    base = load_scenario(ROOT / "scenarios" / "quickstart.yaml")

    def seconds(methods: str, ipc: int = 1) -> float:
        s = load_scenario(base.source, overrides={"distill.methods": methods.split(","), "distill.ipc": [ipc],
                                                  "distill.pipc": [50]})
        return estimate_resources(s)["cpu_seconds"]

    evaluation_only = seconds("random_real")
    assert evaluation_only > 0
    assert seconds("random_real,safe_all") == pytest.approx(2 * evaluation_only)
    # bench/baseline_cpu.jsonl at ipc 1: dm 0.113 s, dkkt_dm 0.272 s per iteration; at ipc 10: 0.638 s, 2.19 s
    assert (seconds("dkkt_dm") - evaluation_only) / (seconds("dm") - evaluation_only) == pytest.approx(0.272 / 0.113)
    dm10, dkkt10 = seconds("dm", 10) - seconds("random_real", 10), seconds("dkkt_dm", 10) - seconds("random_real", 10)
    assert dkkt10 / dm10 == pytest.approx(2.19 / 0.638)
    assert dkkt10 > 5 * (seconds("dkkt_dm") - evaluation_only)  # ipc 10 costs far more than ipc 1


def test_merge_run_configs_later_keys_win_and_overrides_are_joined() -> None:
    merged = merge_run_configs(["clients=2 rounds=1 methods='dm,random_real' overrides='data.train_limit=2000'",
                                "rounds=3 overrides='federation.min_clients=1'"])
    assert merged == {"clients": 2, "rounds": 3, "methods": "dm,random_real",
                      "overrides": "data.train_limit=2000;federation.min_clients=1"}
    assert parse_run_config([format_run_config(merged)]) == merged  # Flower reads back the same values


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deployment_run_config_is_merged_with_the_scripts_own(tmp_path: Path) -> None:
    # SUPERLINK_WAIT=0: the script stops right after the check and the SuperLink's start, which is all we look at
    env = {**os.environ, "VENV": sys.prefix, "SUPERLINK_WAIT": "0", "LOGS": str(tmp_path / "logs"),
           "BASE_PORT": str(_free_port())}
    proc = subprocess.run(["bash", str(ROOT / "scenarios" / "deployment.sh"), "2", "--run-config", "rounds=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    ok = [ln for ln in proc.stdout.splitlines() if ln.startswith("fedpdd check: OK")]
    # the script's own clients=2 and methods survive beside the user's rounds=1 (replaced, quickstart.yaml's 4
    # clients would fail the check against 2 SuperNodes)
    assert ok and "2 clients, 1 rounds, methods dm,random_real" in ok[0], proc.stdout + proc.stderr
    assert ok[0].endswith("runs/deployment")
    assert "did not answer" in proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1


def test_distill_pipc_above_the_pool_stops_with_one_line_and_exit_2(tmp_path: Path) -> None:
    import torch

    from server.store.artifacts import save_safe_artifact

    y = torch.arange(100) % 10  # 10 images per class ...
    y[y == 3] = 4  # ... except class 3: none left, class 4: 20
    y[:5] = 3  # 5 images of class 3
    save_safe_artifact(tmp_path / "safe.pt", torch.zeros(100, 1, 28, 28, dtype=torch.uint8), y, "fashion-mnist")
    proc = subprocess.run([sys.executable, "-m", "server.distill", "--safe", str(tmp_path / "safe.pt"), "--dataset",
                           "fashion-mnist", "--method", "dm", "--ipc", "1", "--pipc", "10", "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "--pipc 10" in lines[0] and "only 5 images of class 3" in lines[0] and "use --pipc 5 or less" in lines[0]
    assert not list((tmp_path / "out").glob("synthetic_*"))  # nothing distilled under a false label


def test_report_on_files_it_cannot_trust_is_one_line_exit_2(tmp_path: Path) -> None:
    from common.scenario import save_resolved

    save_resolved(load_scenario(ROOT / "scenarios" / "quickstart.yaml"), tmp_path)
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / "dm_ipc1_pipc10_seed0.json").write_text('{"method": "dm"}')  # no manifest lists it
    proc = subprocess.run([sys.executable, "-m", "server.report", str(tmp_path), "--cells-only"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("server.report: ") and "no manifest.json" in lines[0] and "Rerun the run" in lines[0]


def test_compare_on_a_folder_that_is_no_run_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "server.compare", str(tmp_path), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "scenario.resolved.yaml is missing: pass run folders that a finished run wrote" in lines[0]


def test_a_mistyped_choice_suggests_the_closest() -> None:
    with pytest.raises(ScenarioError, match=r"'distill.methods\[1\]' is 'dkt_dm' \(did you mean 'dkkt_dm'\?\); choose"):
        resolve(parse_run_config(["methods='dm,dkt_dm'"]))
