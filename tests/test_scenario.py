"""Scenario schema: defaults, validation errors naming key and file, overrides, resolved copy."""

from pathlib import Path

import pytest
import yaml

from common.scenario import (
    ScenarioError,
    load_scenario,
    overrides_from_run_config,
    resolve_from_run_config,
    save_resolved,
    scenario_from_dict,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_defaults_and_pool_pipc(tmp_path):
    s = load_scenario(write(tmp_path, "name: t\ndistill:\n  ipc: [1, 10]\n  pipc: [10, 50]\n"))
    assert s.distill.ipc == [1, 10]
    assert s.pool_pipc == 50
    assert s.data.dataset == "fashion-mnist"
    assert s.evaluation.optimizer == "sam"
    assert s.run_dir == (Path.cwd() / "runs" / "t").resolve()


@pytest.mark.parametrize(
    "text, key",
    [
        ("foo: 1\n", "foo"),
        ("data:\n  datset: cifar10\n", "data.datset"),
        ("data:\n  dataset: imagenet\n", "data.dataset"),
        ("federation:\n  rounds: two\n", "federation.rounds"),
        ("federation:\n  client_eval: 3\n", "federation.client_eval"),
        ("federation:\n  dirichlet_alpha: 0\n", "federation.dirichlet_alpha"),
        ("federation:\n  holdout_fraction: 1.5\n", "federation.holdout_fraction"),
        ("distill:\n  methods: [dm, magic]\n", "distill.methods[1]"),
        ("distill:\n  ipc: [0]\n", "distill.ipc[0]"),
        ("evaluation:\n  optimizer: adam\n", "evaluation.optimizer"),
        ("distill:\n  methods: [random_real]\n  ipc: [10]\n  pipc: [5]\n", "distill.ipc"),
        ("distill:\n  methods: [dm]\n  pipc: [0]\n", "distill.pipc"),
        ("federation:\n  num_clients: 2\n  min_clients: 3\n", "federation.min_clients"),
        ("data:\n  train_limit: 3\nfederation:\n  num_clients: 5\n", "federation.num_clients"),
    ],
)
def test_bad_values_name_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert f"'{key}'" in str(err.value)
    assert str(path) in str(err.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ScenarioError, match="malformed YAML"):
        load_scenario(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ScenarioError, match="not found"):
        load_scenario(tmp_path / "nope.yaml")


def test_pipc_zero_allowed_for_dsv_only():
    s = scenario_from_dict({"distill": {"methods": ["dsv"], "pipc": [0]}})
    assert s.pool_pipc == 0


def test_run_config_overrides():
    overrides = overrides_from_run_config(
        {"scenario": "x", "ipc": "1,10", "rounds": 3, "methods": "dm", "clients": "",
         "overrides": "distill.alpha=0.5; model.width=8"}
    )
    assert overrides == {
        "distill.ipc": [1, 10],
        "federation.rounds": 3,
        "distill.methods": "dm",
        "distill.alpha": 0.5,
        "model.width": 8,
    }
    s = scenario_from_dict({}, overrides=overrides)
    assert s.distill.methods == ["dm"] and s.distill.ipc == [1, 10] and s.model.width == 8
    with pytest.raises(ScenarioError, match="not key=value"):
        overrides_from_run_config({"overrides": "model.width"})
    # a flow mapping or list keeps its commas (scenarios/tune.py and headline.sh pass method_settings as JSON)
    nested = overrides_from_run_config({"overrides": 'distill.method_settings={"dm": {"img_optimizer": "sgd", '
                                                      '"lr_img": 1}, "dkkt_dm": {"lr_img_adam": 0.3}}'})
    assert nested == {"distill.method_settings": {"dm": {"img_optimizer": "sgd", "lr_img": 1},
                                                  "dkkt_dm": {"lr_img_adam": 0.3}}}
    assert overrides_from_run_config({"overrides": "distill.seeds=[0, 1]"}) == {"distill.seeds": [0, 1]}
    with pytest.raises(ScenarioError, match="'model.widht'"):
        scenario_from_dict({}, overrides={"model.widht": 3})


def test_resolve_from_run_config_uses_app_dir_and_env(tmp_path, monkeypatch):
    s = resolve_from_run_config({"scenario": "scenarios/quickstart.yaml", "rounds": 1})
    assert s.federation.rounds == 1
    path = write(tmp_path, "name: envy\n")
    monkeypatch.setenv("FEDPDD_SCENARIO", str(path))
    assert resolve_from_run_config({}).name == "envy"


def test_save_resolved_round_trip(tmp_path):
    s = scenario_from_dict({"name": "rt", "distill": {"ipc": [1, 3]}}, source="mem")
    target = save_resolved(s, tmp_path / "run")
    again = scenario_from_dict(yaml.safe_load(target.read_text()))
    assert again.to_dict() == s.to_dict()
