"""scenarios/tune.py: the same search per method, scored on validation cells only, the best picked."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scenarios"))
import tune  # noqa: E402


def _cell(folder: Path, method: str, seed: int, accs: list[float], split: str = "validation") -> None:
    (folder / "cells").mkdir(parents=True, exist_ok=True)
    rec = {"cell": {"method": method, "seed": seed}, "config": {"evaluation": {"split": split}},
           "result": {"accuracies": accs}}
    (folder / "cells" / f"{method}_seed{seed}.json").write_text(json.dumps(rec))


def _args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(out=tmp_path, fed=tmp_path / "fed", scenario="s.yaml", methods=["dm", "dkkt_dm"],
                              ipc=1, pipc=10, seeds=[0, 1], num_models=2)


def test_grid_parsing() -> None:
    assert tune.parse_grid("sgd:1,3;adam:0.1") == [("sgd", 1.0), ("sgd", 3.0), ("adam", 0.1)]
    with pytest.raises(ValueError, match="expected"):
        tune.parse_grid("rmsprop:1")


def test_each_method_gets_its_own_best_setting(tmp_path: Path) -> None:
    grid = [("sgd", 1.0), ("adam", 0.1)]
    sgd, adam = tmp_path / "sgd-lr1", tmp_path / "adam-lr0.1"
    for seed in (0, 1):
        _cell(sgd, "dm", seed, [0.60, 0.62])      # dm: 61 % with SGD
        _cell(adam, "dm", seed, [0.58, 0.58])     #     58 % with Adam
        _cell(sgd, "dkkt_dm", seed, [0.50, 0.52])  # dkkt_dm: 51 % with SGD
        _cell(adam, "dkkt_dm", seed, [0.66, 0.64])  #         65 % with Adam
    picks = tune.report(_args(tmp_path), grid)
    assert picks == {"dm": {"img_optimizer": "sgd", "lr_img": 1.0, "momentum_img": 0.5},
                     "dkkt_dm": {"img_optimizer": "adam", "lr_img_adam": 0.1}}
    assert yaml.safe_load((tmp_path / "method_settings.yaml").read_text()) == picks
    text = (tmp_path / "tuning.md").read_text()
    assert "| dm | 61.00 ± 1.00 | 58.00 ± 0.00 | sgd-lr1 |" in text


def test_a_cell_scored_on_the_test_split_is_refused(tmp_path: Path) -> None:
    _cell(tmp_path / "sgd-lr1", "dm", 0, [0.6], split="test")
    with pytest.raises(ValueError, match="validation split"):
        tune.report(_args(tmp_path), [("sgd", 1.0)])
