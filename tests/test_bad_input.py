"""Bad input: each case gives one clear error naming the key or file (and the fix) before
any expensive work starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.datasets import get_meta
from common.models import build_model
from common.scenario import ScenarioError, load_scenario, scenario_from_dict
from server.store.artifacts import ArtifactError, save_model_artifact, save_safe_artifact


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_malformed_yaml_names_the_file(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "federation: {rounds: 2\n  lr: [")
    with pytest.raises(ScenarioError, match=rf"{path.name}: malformed YAML"):
        load_scenario(path)


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="top level must be a mapping"):
        load_scenario(_yaml(tmp_path, "- a\n- b\n"))


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"unknown key 'federation.roundz' \(did you mean 'rounds'\?\); valid keys here: .*rounds"):
        load_scenario(_yaml(tmp_path, "federation:\n  roundz: 2\n"))


@pytest.mark.parametrize("text, key", [
    ("federation:\n  rounds: two\n", "federation.rounds"),
    ("federation:\n  reply_timeout_s: soon\n", "federation.reply_timeout_s"),
    ("distill:\n  ipc: [1, x]\n", r"distill.ipc\[1\]"),
    ("faults:\n  clients: one\n", r"faults.clients"),
    ("data: cifar10\n", "data"),
])
def test_wrong_type_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ScenarioError, match=key):
        load_scenario(_yaml(tmp_path, text))


def test_unknown_dataset() -> None:
    with pytest.raises(ScenarioError, match="key 'data.dataset' is 'imagenet'; choose one of"):
        scenario_from_dict({"data": {"dataset": "imagenet"}})


def test_ipc_larger_than_pool_in_real_init_mode() -> None:
    with pytest.raises(ScenarioError, match="distill.ipc"):
        scenario_from_dict({"distill": {"methods": ["dm"], "init": "real", "ipc": [10], "pipc": [5]}})


def test_more_clients_than_samples() -> None:
    from server.preflight import check_data_size

    with pytest.raises(ScenarioError, match="federation.num_clients"):
        scenario_from_dict({"data": {"train_limit": 4}, "federation": {"num_clients": 5}})
    s = scenario_from_dict({"federation": {"num_clients": 50}})
    with pytest.raises(ScenarioError, match=r"'federation.num_clients' \(50\) exceeds the 20 training samples"):
        check_data_size(s, 20)  # known only once the data is loaded (no train_limit)
    check_data_size(s, 50)


def test_min_clients_above_num_clients() -> None:
    with pytest.raises(ScenarioError, match="federation.min_clients"):
        scenario_from_dict({"federation": {"num_clients": 2, "min_clients": 3}})


def test_missing_data_folder_stops_before_federation(tmp_path: Path) -> None:
    from server.run import run_scenario

    s = scenario_from_dict({"data": {"root": str(tmp_path / "nope")}, "output_dir": str(tmp_path / "run")})
    # grid=None: the check must fire before anything talks to the federation
    with pytest.raises(ScenarioError, match=r"key 'data.root' is .*nope.*does not exist.*data.download"):
        run_scenario(None, s)  # type: ignore[arg-type]
    (tmp_path / "file").write_text("x")
    s = scenario_from_dict({"data": {"root": str(tmp_path / "file")}})
    from server.preflight import check_data_root

    with pytest.raises(ScenarioError, match="is a file, not a folder"):
        check_data_root(s)


def test_pipc_larger_than_the_clients_hold() -> None:
    from common.records import ImageSet
    from server.federation.collect import CollectError, SafeReply, plan_collection

    def ask(requests):  # every client holds 2 images per class
        out = {}
        for node, (quota, offset) in requests.items():
            give = [max(0, min(q, 2 - o)) for q, o in zip(quota, offset)]
            y = torch.tensor([c for c, g in enumerate(give) for _ in range(g)], dtype=torch.int64)
            out[node] = SafeReply(ImageSet(torch.zeros(len(y), 1, 2, 2, dtype=torch.uint8), y),
                                  np.array([q - g for q, g in zip(quota, give)]), node, 0)
        return out

    with pytest.raises(CollectError, match=r"hold only 4 shareable images of class 0.*lower distill.pipc"):
        plan_collection([0, 1], num_classes=2, pipc=10, ask=ask)


# ------------------------------------------------------------------ reuse_artifacts files


def _reuse_dir(tmp_path: Path, width_trained: int = 8, arch_claimed: int = 8, safe_x=None) -> Path:
    meta = get_meta("fashion-mnist")
    d = tmp_path / "old"
    save_model_artifact(d / "global_model.pt", build_model(meta, {"width": width_trained}), {"width": arch_claimed},
                        meta.name)
    x = safe_x if safe_x is not None else torch.zeros(20, 1, 28, 28, dtype=torch.uint8)
    torch.save({"x": x, "y": torch.arange(len(x)) % 10, "dataset": meta.name, "extra": {}}, d / "safe_pool.pt")
    from server.store.manifest import record_files

    record_files(d, ["global_model.pt", "safe_pool.pt"])  # a reused folder must have its manifest
    return d


def _load(folder: Path, width: int = 8):
    from server.pipeline import load_reused

    s = scenario_from_dict({"model": {"width": width}, "reuse_artifacts": str(folder),
                            "distill": {"pipc": [2], "methods": ["dm"]}})
    return load_reused(folder, get_meta("fashion-mnist"), s)


def test_reuse_of_a_good_folder_works(tmp_path: Path) -> None:
    state, x, y, _ = _load(_reuse_dir(tmp_path))
    assert x.shape == (20, 1, 28, 28) and len(state)


def test_model_file_of_another_architecture(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"global_model.pt was trained with model .*'width': 8"):
        _load(_reuse_dir(tmp_path), width=16)
    # 'arch' says width 8 but the weights are width 16: the weights are checked too
    with pytest.raises(ArtifactError, match=r"(?s)global_model.pt.*do not fit.*Fix: set the model section"):
        _load(_reuse_dir(tmp_path, width_trained=16, arch_claimed=8))


@pytest.mark.parametrize("x, match", [
    (torch.zeros(20, 1, 28, 28, dtype=torch.float32), "dtype torch.uint8"),
    (torch.zeros(20, 3, 32, 32, dtype=torch.uint8), r"images are \(3, 32, 32\)"),
    (torch.zeros(20, 28, 28, dtype=torch.uint8), "N×C×H×W"),
])
def test_safe_set_file_with_wrong_shape_or_dtype(tmp_path: Path, x: torch.Tensor, match: str) -> None:
    with pytest.raises(ArtifactError, match=rf"safe_pool.pt.*{match}|{match}"):
        _load(_reuse_dir(tmp_path, safe_x=x))


def test_safe_set_file_with_too_few_images(tmp_path: Path) -> None:
    d = _reuse_dir(tmp_path, safe_x=torch.zeros(10, 1, 28, 28, dtype=torch.uint8))  # 1 per class, pipc 2 needed
    with pytest.raises(ValueError, match=r"safe_pool.pt holds .* fewer than max\(distill.pipc\) = 2"):
        _load(d)


def test_missing_reuse_folder(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"model file .*missing.*global_model.pt does not exist"):
        _load(tmp_path / "missing")


def test_reused_folder_without_manifest_is_refused(tmp_path: Path) -> None:
    from server.store.manifest import ManifestError

    d = _reuse_dir(tmp_path)
    (d / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=r"global_model.pt, safe_pool.pt but no manifest.json: .*not used"):
        _load(d)


def test_reused_file_changed_since_its_manifest(tmp_path: Path) -> None:
    from server.store.manifest import ManifestError, record_files, verify_files

    d = _reuse_dir(tmp_path)
    record_files(d, ["global_model.pt", "safe_pool.pt"])
    save_safe_artifact(d / "safe_pool.pt", torch.ones(20, 1, 28, 28, dtype=torch.uint8), torch.arange(20) % 10,
                       "fashion-mnist")
    with pytest.raises(ManifestError, match=r"safe_pool.pt does not match .*manifest.json"):
        verify_files(d, ["global_model.pt", "safe_pool.pt"])
