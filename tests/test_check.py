"""server.check: the fast pre-run check and the run status that scripts turn into an exit code."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.scenario import ScenarioError
from server.check import check, check_federation, parse_run_config, read_status, resolve, write_status

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "server.check", *args], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    return proc, time.perf_counter() - t0


def test_unknown_run_config_key_is_named_with_value_and_valid_keys() -> None:
    with pytest.raises(ScenarioError) as err:
        parse_run_config(["roundz=3"])
    msg = str(err.value)
    assert "--run-config" in msg and "'roundz'" in msg and "3" in msg
    assert "rounds" in msg and "overrides" in msg  # the valid keys are listed


def test_bad_run_config_value_is_blamed_on_the_command_line_not_the_file() -> None:
    with pytest.raises(ScenarioError) as err:
        resolve(parse_run_config(["rounds='many'"]))
    msg = str(err.value)
    assert msg.startswith("--run-config rounds='many'"), msg
    assert "federation.rounds" in msg and "integer" in msg
    # the same key set wrongly in the free-form overrides names that origin
    with pytest.raises(ScenarioError, match=r"--run-config overrides 'distill.iterations=-3'.*distill.iterations"):
        resolve(parse_run_config(["overrides='distill.iterations=-3'"]))


def test_bad_yaml_value_is_blamed_on_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nfederation:\n  rounds: zero\n")
    with pytest.raises(ScenarioError) as err:
        resolve({"scenario": str(bad)})
    assert str(err.value).startswith(str(bad.resolve())) and "federation.rounds" in str(err.value)


def test_overrides_apply_on_top_of_the_yaml() -> None:
    s = resolve(parse_run_config(["rounds=3 ipc='1,10' methods='dm,dkkt_dm' overrides='distill.alpha=0.05'"]))
    assert s.federation.rounds == 3 and s.distill.ipc == [1, 10] and s.distill.methods == ["dm", "dkkt_dm"]
    assert s.distill.alpha == 0.05


def test_overrides_valid_only_together_are_accepted() -> None:
    # clients=2 alone breaks min_clients=4 of the YAML; with min_clients=2 beside it the pair is fine
    s = resolve(parse_run_config(["clients=2 overrides='federation.min_clients=2'"]))
    assert s.federation.num_clients == 2 and s.federation.min_clients == 2
    with pytest.raises(ScenarioError, match=r"^--run-config clients=2: key 'federation.min_clients'"):
        resolve(parse_run_config(["clients=2"]))


def test_client_count_mismatch_names_federation_num_clients() -> None:
    s = resolve({})
    check_federation(s, s.federation.num_clients)  # matching: fine
    with pytest.raises(ScenarioError, match=r"federation.num_clients' is 4 but the federation has 2 SuperNodes"):
        check_federation(s, 2)
    with pytest.raises(ScenarioError, match="min_clients"):
        check(parse_run_config(["clients=''"]) | {"overrides": "federation.num_clients=null"}, 2)


def test_cli_is_fast_and_exits_nonzero_with_the_key(tmp_path: Path) -> None:
    start = subprocess.run([sys.executable, "-c", "import yaml, flwr.common.config"], capture_output=True, timeout=120)
    assert start.returncode == 0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import yaml, flwr.common.config"], timeout=120)
    startup = time.perf_counter() - t0  # interpreter + imports on this machine, now

    ok, wall = _cli("--num-supernodes", "4")
    assert ok.returncode == 0, ok.stderr
    assert "OK quickstart" in ok.stdout
    # the check itself: seconds beyond start-up. Both scale with the load (seen: 2 s vs 7 s at load 9-21),
    # hence the factor; that it never loads torch is tests/test_import_graph.py's job.
    assert wall < 3 * startup + 5.0

    bad, _ = _cli("--run-config", "roundz=3")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("fedpdd check: --run-config: unknown key 'roundz'")

    mismatch, _ = _cli("--num-supernodes", "3")
    assert mismatch.returncode == 2 and "federation.num_clients" in mismatch.stderr

    rd, _ = _cli("--print-run-dir", "--run-config", f"output-dir='{tmp_path}'")
    assert rd.returncode == 0 and rd.stdout.strip() == str(tmp_path)


def test_status_file_round_trip_and_cli_exit(tmp_path: Path) -> None:
    status = tmp_path / "status.json"
    assert write_status(True, path=status, run_dir=tmp_path) == status
    assert read_status(status) == (True, f"finished: results in {tmp_path}")
    proc, _ = _cli("--status", str(status))
    assert proc.returncode == 0

    write_status(False, RuntimeError("only 1 of the 4 required clients answered\nmore detail"), path=status)
    assert json.loads(status.read_text())["ok"] is False
    proc, _ = _cli("--status", str(status))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "fedpdd: run FAILED: RuntimeError: only 1 of the 4 required clients answered")

    missing, _ = _cli("--status", str(tmp_path / "nope.json"))
    assert missing.returncode == 1 and "never reported" in missing.stderr


def test_write_status_without_a_target_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDPDD_STATUS_FILE", raising=False)
    assert write_status(True) is None
    monkeypatch.setenv("FEDPDD_STATUS_FILE", str(tmp_path / "s.json"))
    assert write_status(False, ValueError("x")) == tmp_path / "s.json"
    assert read_status(tmp_path / "s.json") == (False, "ValueError: x")
