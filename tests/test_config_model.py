"""One config model (common/config.py): the scenario's sections are the engine's configs.

The fixtures under tests/data/ were written by the code of main 37952bd, just BEFORE the sections and the engine's
configs became one model (scenario.py's DistillSection/EvalSection copied by name into the engine's
DistillConfig/EvalConfig by server.pipeline._section_to; the offline CLI's hand-written flags). These
tests prove that every bundled scenario and the CLI still resolve to the same engine settings.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import (DEVICE_PROFILE, DistillConfig, EvalConfig, add_arguments, default_alpha, engine_fields,
                           from_arguments, profile_value)
from common.grid import PIPC_ALL
from common.scenario import ScenarioError, apply_device_profile, load_scenario, scenario_from_dict

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
BEFORE = json.loads((DATA / "scenario_resolution_before.json").read_text())
CLI_BEFORE = json.loads((DATA / "distill_cli_before.json").read_text())

# Engine knobs a scenario could not set before (the engine had them, the YAML section did not).
NEWLY_REACHABLE = {"distill": {"dsa_strategy", "log_every", "lambda_optimizer", "aug_passes", "stat_candidates",
                               "stat_at", "stat_path_points", "stat_variant", "diagnose_samples", "diagnose_path_points"},
                   "evaluation": {"lr_decay_at_half", "dsa_strategy", "parallel_models"}}
# Engine knobs added after the fixtures were written (the DKKT approximations, the stationarity options), at their defaults
# the engine behaves as before; they must come out at those defaults.
ADDED_AFTER = {"aug_passes": "both", "stat_candidates": 0, "stat_at": "theta_star", "stat_path_points": 3,
               "stat_variant": "project", "diagnose_samples": 100, "diagnose_path_points": 5, "safe_draw": "random"}
# Scenario keys added after the fixtures (validation split, FedAvg plateau, per-method settings, the scored
# split, the robust aggregation, the Ray executor and shards); at these defaults a run does what it did before,
# except safe_draw (random per seed, was first); update_norm_bound only rejects updates 10x the global model's
# norm (honest ones stay under 1).
ADDED_AFTER_RESOLVED = {"data": {"validation_size": 0}, "federation": {"plateau_rounds": 0, "plateau_delta": 0.3,
                                                                "strategy": "fedavg", "byzantine_clients": 0,
                                                                "trim_beta": 0.2, "update_norm_bound": 10.0,
                                                                "update_norm_action": "reject"},
                        "distill": {"safe_draw": "random", "method_settings": {}, "executor": "process",
                                    "ray_address": None, "ray_gpus": 1.0, "ray_max_retries": 3, "cells": None,
                                    "shard": None},
                        "evaluation": {"split": "test"}}


def _on_cpu(d: dict, section: str) -> dict:
    """``d`` with the device-profile settings the engine resolves on the CPU (None -> the CPU's value)."""
    for dotted in DEVICE_PROFILE:
        sec, key = dotted.split(".")
        if sec == section and key in d:
            d[key] = profile_value(dotted, d[key], "cpu")
    return d


def _engine_before(cfg: DistillConfig) -> dict:
    """engine_dict on the CPU without the knobs added after the fixtures (checked to be at their defaults)."""
    d = _on_cpu(_plain(cfg.engine_dict()), "distill")
    assert {k: d.pop(k) for k in ADDED_AFTER} == ADDED_AFTER
    return d


def _plain(obj):
    return json.loads(json.dumps(obj))  # tuples -> lists, as the fixture stores them


@pytest.mark.parametrize("name", sorted(k for k in BEFORE if k.endswith(".yaml")))
def test_bundled_scenarios_resolve_to_the_same_engine_configs(name: str) -> None:
    before = BEFORE[name]
    s = load_scenario(ROOT / "scenarios" / name)
    # what synthesize and evaluate_synthetic receive: exactly the old engine configs
    assert _engine_before(s.distill) == before["distill_engine"]
    evaluation = _on_cpu(_plain(dataclasses.asdict(s.evaluation)), "evaluation")
    assert evaluation.pop("split") == "test"
    assert {k: v for k, v in evaluation.items() if k not in ("width", "depth")} == before["eval_engine"]
    assert (evaluation["width"], evaluation["depth"]) == (before["resolved"]["evaluation"]["width"],
                                                          before["resolved"]["evaluation"]["depth"])
    # the saved resolved scenario keeps every key and value; the only new keys are the newly reachable knobs
    resolved = _plain(apply_device_profile(s, "cpu")[0].to_dict())  # what a CPU run saves
    for section, added in ADDED_AFTER_RESOLVED.items():
        assert {k: resolved[section].pop(k) for k in added} == added
    assert resolved["privacy"]["dp"].pop("delta") == 1e-5  # the delta at which epsilon is stated
    for section in ("distill", "evaluation"):
        new = set(resolved[section]) - set(before["resolved"][section])
        assert new == NEWLY_REACHABLE[section]
        for key in new:
            resolved[section].pop(key)
    assert resolved == before["resolved"]


@pytest.mark.parametrize("case", CLI_BEFORE, ids=["defaults", "every-flag"])
def test_cli_flags_build_the_same_configs(case: dict) -> None:
    from server.distill.__main__ import build_parser

    args = build_parser().parse_args(case["argv"])
    assert _engine_before(from_arguments(DistillConfig, args)) == case["distill"]
    ecfg = _on_cpu(_plain(dataclasses.asdict(from_arguments(EvalConfig, args, prefix="eval-"))), "evaluation")
    assert ecfg.pop("split") == "test"
    assert ecfg["epochs"] == case["other"]["eval_epochs"]
    assert (ecfg.pop("width"), ecfg.pop("depth")) == (case["other"]["eval_width"], case["other"]["eval_depth"])
    assert ecfg == case["evaluation"]
    for key in ("model", "safe", "dataset", "method", "ipc", "pipc", "out", "data_root", "download", "test_limit",
                "device", "seed", "dsv", "width", "depth", "init_seed", "no_progress"):
        value = getattr(args, key)
        assert (str(value) if isinstance(value, Path) else value) == case["other"][key], key


def test_every_engine_knob_has_a_flag_and_a_scenario_key() -> None:
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p, DistillConfig)
    add_arguments(p, EvalConfig, prefix="eval-")
    flags = {a.dest for a in p._actions}
    assert {f.name for f in engine_fields(DistillConfig)} <= flags
    assert {f"eval_{f.name}" for f in engine_fields(EvalConfig)} <= flags
    from scenarios import schema_doc

    keys = {k for k, *_ in schema_doc.keys()}
    assert {f"distill.{f.name}" for f in dataclasses.fields(DistillConfig)} <= keys
    assert {f"evaluation.{f.name}" for f in dataclasses.fields(EvalConfig)} <= keys
    assert all(meaning and "no description" not in meaning for *_, meaning in schema_doc.keys())


def test_legacy_flag_names_still_work() -> None:
    from server.distill.__main__ import build_parser

    args = build_parser().parse_args(["--dataset", "mnist", "--method", "dm", "--ipc", "1", "--out", "x", "--no-dsa",
                                      "--time-budget", "5", "--num-models", "2", "--no-eval-dsa", "--eval-lr", "0.2"])
    d, e = from_arguments(DistillConfig, args), from_arguments(EvalConfig, args, prefix="eval-")
    assert (d.dsa, d.time_budget_s, e.num_models, e.dsa, e.lr) == (False, 5.0, 2, False, 0.2)


def test_newly_reachable_knobs_reach_the_engine() -> None:
    s = scenario_from_dict({"distill": {"log_every": 3, "lambda_optimizer": "sgd", "dsa_strategy": "flip"},
                            "evaluation": {"lr_decay_at_half": False, "parallel_models": True,
                                           "dsa_strategy": "none"}})
    assert isinstance(s.distill, DistillConfig) and isinstance(s.evaluation, EvalConfig)
    assert (s.distill.log_every, s.distill.lambda_optimizer, s.distill.dsa_strategy) == (3, "sgd", "flip")
    assert (s.evaluation.lr_decay_at_half, s.evaluation.parallel_models, s.evaluation.dsa_strategy) == \
        (False, True, "none")


@pytest.mark.parametrize("text, match", [
    ("distill:\n  log_every: 0\n", r"key 'distill.log_every' must be >= 1, got 0"),
    ("distill:\n  lambda_optimizer: rmsprop\n", r"key 'distill.lambda_optimizer' is 'rmsprop'; choose one of adam, sgd"),
    ("distill:\n  dsa_strategy: flip_warp\n", r"key 'distill.dsa_strategy' is 'flip_warp': unknown DSA op"),
    ("evaluation:\n  parallel_models: maybe\n", r"key 'evaluation.parallel_models' must be true or false, got 'maybe'"),
    # checked by the engine only, at run time, before the sections and the configs were one model:
    ("distill:\n  momentum_img: 1.0\n", r"key 'distill.momentum_img' must be in \[0, 1\), got 1.0"),
    ("distill:\n  lr_lambda: 0\n", r"key 'distill.lr_lambda' must be > 0, got 0.0"),
    ("distill:\n  lambda_init: 0\n", r"key 'distill.lambda_init' must be > 0 when lambda_param is 'log', got 0.0"),
    ("evaluation:\n  momentum: 1.5\n", r"key 'evaluation.momentum' must be in \[0, 1\), got 1.5"),
])
def test_yaml_errors_name_key_value_and_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=match) as err:
        load_scenario(path)
    assert str(err.value).startswith(f"{path}: ")


def test_config_built_in_python_names_the_class_and_key() -> None:
    with pytest.raises(ValueError, match=r"^key 'DistillConfig.momentum_img' must be in \[0, 1\), got 2"):
        DistillConfig(momentum_img=2).validate()
    with pytest.raises(ValueError, match=r"^key 'EvalConfig.num_models' must be > 0, got 0"):
        EvalConfig(num_models=0).validate()
    assert DistillConfig(iterations=0).validate().iterations == 0  # the engine takes 0 (returns the start) ...
    with pytest.raises(ScenarioError, match=r"key 'distill.iterations' must be > 0, got 0"):
        scenario_from_dict({"distill": {"iterations": 0}})  # ... a scenario does not (a typo)


def test_alpha_default_resolved_in_one_place() -> None:
    assert default_alpha(PIPC_ALL) == 0.001  # appendix A's 'all' column (the sweep asks alpha_for(PIPC_ALL))
    cfg = DistillConfig()
    assert [cfg.alpha_for(p) for p in (10, 50, 51, PIPC_ALL)] == [0.1, 0.01, 0.001, 0.001]
    assert DistillConfig(alpha=0.5).alpha_for(PIPC_ALL) == 0.5
    assert [cfg.gamma_for(i) for i in (1, 50)] == [0.001, 0.01]


def test_choices_match_the_engine() -> None:
    from common.config import PRIMAL_MODES, STAT_DISTANCES
    from common.distill import dkkt

    assert STAT_DISTANCES == dkkt.STAT_DISTANCES and PRIMAL_MODES == dkkt.PRIMAL_MODES
    assert DistillConfig().aug_weight == dkkt.DEFAULT_AUG_WEIGHT


def test_check_names_a_bad_run_config_value() -> None:
    out = subprocess.run([sys.executable, "-m", "server.check", "--run-config", "overrides='distill.log_every=0'"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--run-config overrides 'distill.log_every=0': key 'distill.log_every' must be >= 1, got 0" in out.stderr


def test_cli_bad_flag_names_the_scenario_key(tmp_path: Path, capsys) -> None:
    from server.distill.__main__ import main

    rc = main(["--dataset", "fashion-mnist", "--method", "dsv", "--ipc", "1", "--out", str(tmp_path),
               "--momentum-img", "2", "--eval-epochs", "0"])
    assert rc == 2
    assert "key 'distill.momentum_img' must be in [0, 1), got 2.0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before any work
