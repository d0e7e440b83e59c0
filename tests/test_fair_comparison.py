"""What makes a comparison between methods fair: a validation split no client holds, one start for
every method of a grid, per-method tuned settings, seeded safe-image draws, a FedAvg plateau rule."""

from __future__ import annotations

import pytest
import torch

from common.config import ConfigError, DistillConfig
from common.dataset_meta import get_meta
from common.datasets import DatasetSplits
from common.distill.synthesize import make_embed_factory, synthesize
from common.models import build_model
from common.scenario import load_scenario
from server.federation.federate import plateau_stop

META = get_meta("fashion-mnist")
ARCH = {"width": 8, "depth": 2}


def _splits(n_train: int = 200, n_test: int = 50) -> DatasetSplits:
    y = torch.arange(10).repeat(n_train // 10)
    x = torch.arange(n_train, dtype=torch.int64).view(-1, 1, 1, 1).expand(-1, 1, 28, 28).to(torch.uint8)
    ids = torch.arange(n_train)  # pixel values wrap at 256: keep the true id beside them
    splits = DatasetSplits(train_x=x, train_y=y, test_x=x[:n_test], test_y=y[:n_test], meta=META)
    splits.train_x = ids.view(-1, 1, 1, 1).float()  # ids as "images": lets the test see which rows went where
    return splits


def test_validation_split_is_balanced_disjoint_and_taken_before_train_limit() -> None:
    out = _splits().limit(train_limit=60, validation_size=50, seed=3)
    val_ids = set(out.val_x.flatten().long().tolist())
    train_ids = set(out.train_x.flatten().long().tolist())
    assert len(val_ids) == 50 and len(train_ids) == 60 and not val_ids & train_ids
    assert torch.bincount(out.val_y, minlength=10).tolist() == [5] * 10
    assert torch.bincount(out.train_y, minlength=10).tolist() == [6] * 10
    # the held-out images are the same whatever train_limit is (a study can grow its federation)
    assert set(_splits().limit(train_limit=100, validation_size=50, seed=3).val_x.flatten().long().tolist()) == val_ids
    assert out.scoring_split("validation")[1] is out.val_y and out.scoring_split("test")[1] is out.test_y
    with pytest.raises(ValueError, match="validation_size"):
        _splits().limit(validation_size=0).scoring_split("validation")
    with pytest.raises(ValueError, match="leaves no training images"):
        _splits().limit(validation_size=200)


def test_validation_split_off_changes_nothing() -> None:
    a, b = _splits().limit(train_limit=60, seed=3), _splits().limit(train_limit=60, seed=3, validation_size=0)
    assert torch.equal(a.train_x, b.train_x) and a.val_x is None


@pytest.mark.parametrize("override,key", [({"evaluation": {"split": "validation"}}, "evaluation.split"),
                                          ({"federation": {"plateau_rounds": 5, "rounds": 30}},
                                           "federation.plateau_rounds")])
def test_choices_scored_on_held_out_images_need_a_validation_split(tmp_path, override, key) -> None:
    with pytest.raises(ConfigError, match=key):
        load_scenario("scenarios/quickstart.yaml", overrides=override)
    with_val = {**override, "data": {"validation_size": 1000}}
    load_scenario("scenarios/quickstart.yaml", overrides=with_val)


def test_plateau_stop_by_hand() -> None:
    # round 0..: best before the window 0.80; window of 3 gains 0.002 <= 0.003: stop
    assert plateau_stop([0.1, 0.7, 0.80, 0.801, 0.802, 0.799], window=3, delta=0.003)
    assert not plateau_stop([0.1, 0.7, 0.80, 0.801, 0.806, 0.799], window=3, delta=0.003)  # +0.6 pt: go on
    assert not plateau_stop([0.1, 0.7, 0.80], window=3, delta=0.003)  # not enough rounds yet
    assert not plateau_stop([0.5] * 10, window=0, delta=0.003)  # 0: off


def test_method_settings_apply_to_their_method_only_and_are_checked() -> None:
    cfg = DistillConfig(method_settings={"dm": {"img_optimizer": "sgd", "lr_img": 3}})
    cfg.validate()
    assert cfg.for_method("dm").img_optimizer == "sgd" and cfg.for_method("dm").lr_img == 3.0
    assert cfg.for_method("dkkt_dm") is cfg and cfg.img_optimizer == "adam"
    with pytest.raises(ConfigError, match=r"method_settings\.dm\.iterations.*cannot differ"):
        DistillConfig(method_settings={"dm": {"iterations": 5}}).validate()
    with pytest.raises(ConfigError, match="not a method"):
        DistillConfig(method_settings={"dmm": {"lr_img": 1}}).validate()
    with pytest.raises(ConfigError, match=r"method_settings\.dm\.lr_img"):
        DistillConfig(method_settings={"dm": {"lr_img": -1}}).validate()


def _start(method: str, ipc: int, seed: int = 0):
    g = torch.Generator().manual_seed(0)
    sy = torch.arange(10).repeat(4)
    sx = torch.randn(len(sy), 1, 28, 28, generator=g)
    return synthesize(method, ipc=ipc, num_classes=10, image_shape=(1, 28, 28), pipc=4, safe_x=sx, safe_y=sy,
                      model=build_model(META, ARCH, seed=1), embed_factory=make_embed_factory(META, ARCH),
                      init_model=build_model(META, ARCH, seed=2), config=DistillConfig(iterations=0),
                      seed=seed, device="cpu", progress=False)


@pytest.mark.parametrize("ipc,init", [(1, "noise"), (2, "real")])
def test_every_method_of_a_grid_starts_from_the_same_images(ipc: int, init: str) -> None:
    dm, dkkt = _start("dm", ipc), _start("dkkt_dm", ipc)
    assert dm.info["init"].startswith(init) and dkkt.info["init"].startswith(init)
    assert torch.equal(dm.x, dkkt.x)  # zero iterations: the start itself
    ref = _start("dm_reference", 1)
    assert ref.info["init"].startswith("real") and ref.info["img_optimizer"] == "sgd"
