"""Absurd scenario values fail at validation, naming the key, before any run folder exists (issue #13)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from common.scenario import ScenarioError, check_resources, estimate_resources, load_scenario, scenario_from_dict


@pytest.mark.parametrize("key, value", [
    ("federation.lr", "nan"), ("federation.lr", "inf"), ("distill.lr_img", "nan"), ("distill.alpha", "nan"),
    ("federation.dirichlet_alpha", "nan"), ("federation.reply_timeout_s", "nan"),
    ("federation.reply_timeout_s", "inf"), ("privacy.dp.clipping_norm", "inf"),
    ("privacy.dp.noise_multiplier", "nan"), ("evaluation.rho", "-inf"), ("distill.time_budget_s", "inf"),
])
def test_nan_and_inf_are_refused(tmp_path: Path, key: str, value: str) -> None:
    tree: dict = {}
    node = tree
    *sections, name = key.split(".")
    for part in sections:
        node = node.setdefault(part, {})
    node[name] = float(value)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tree))  # written as .nan / .inf / -.inf, as a user would
    with pytest.raises(ScenarioError, match=rf"key '{key}' must be a finite number"):
        load_scenario(path)


@pytest.mark.parametrize("values, match", [
    ({"seed": 2**70}, r"key 'seed'"),
    ({"seed": -1}, r"key 'seed' must be >= 0"),
    ({"seed": 2**32}, r"key 'seed' must be in 0..4294967295"),
    ({"distill": {"seeds": [1, 2**40]}}, r"key 'distill.seeds\[1\]' must be in 0..4294967295"),
    ({"faults": {"seed": 2**33}}, r"key 'faults.seed'"),
    ({"distill": {"iterations": 10**12}}, r"key 'distill.iterations' is 1000000000000, above the limit"),
    ({"evaluation": {"epochs": 10**9}}, r"key 'evaluation.epochs' is 1000000000, above the limit"),
    ({"model": {"width": 10**6}}, r"key 'model.width' is 1000000, above the limit"),
    ({"federation": {"rounds": 0}}, r"key 'federation.rounds' must be >= 1"),
    ({"federation": {"reply_timeout_s": 10**9}}, r"key 'federation.reply_timeout_s'"),
])
def test_integer_bounds(values: dict, match: str) -> None:
    with pytest.raises(ScenarioError, match=match):
        scenario_from_dict(values)


def test_edge_values_still_pass() -> None:
    s = scenario_from_dict({"seed": 2**32 - 1, "distill": {"seeds": [0, 4294967295]}})
    assert s.seed == 2**32 - 1
    import torch

    torch.manual_seed(s.seed)  # the documented range is one torch accepts


def test_memory_estimate_refuses_what_cannot_fit() -> None:
    big = scenario_from_dict({"distill": {"ipc": [100000], "methods": ["dm"]}})
    with pytest.raises(ScenarioError, match=r"needs about .* GiB .*max\(distill.ipc\) = 100000.* available"):
        check_resources(big, available=16 * 2**30)
    small = scenario_from_dict({"model": {"width": 8}, "distill": {"iterations": 2}})
    assert check_resources(small, available=16 * 2**30) == []
    est = estimate_resources(small)
    assert 0 < est["peak_bytes"] < 2**30


def test_a_long_grid_gets_a_time_warning() -> None:
    s = scenario_from_dict({"distill": {"iterations": 10**7}})
    (warning,) = check_resources(s, available=2**50)
    assert "CPU hours" in warning and "distill.iterations" in warning


def test_refused_before_the_run_folder_exists(tmp_path: Path) -> None:
    from server.run import run_scenario

    s = scenario_from_dict({"output_dir": str(tmp_path / "out"), "distill": {"ipc": [100000], "methods": ["dm"]}})
    import common.scenario

    mp = pytest.MonkeyPatch()
    mp.setattr(common.scenario, "_available_bytes", lambda: 16 * 2**30)
    try:
        with pytest.raises(ScenarioError, match="GiB"):
            run_scenario(None, s)  # type: ignore[arg-type] - refused before the grid is touched
    finally:
        mp.undo()
    assert not (tmp_path / "out").exists()


def test_yaml_aliases_are_refused_quickly(tmp_path: Path) -> None:
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ScenarioError, match=r"(?s)alias '\*a0'.*not allowed"):
        load_scenario(path)
    assert time.perf_counter() - t0 < 2.0
    plain = tmp_path / "alias.yaml"
    plain.write_text("federation: &f {rounds: 1}\nevaluation: {epochs: 1}\nother: *f\n")
    with pytest.raises(ScenarioError, match="alias"):
        load_scenario(plain)
