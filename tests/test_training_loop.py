"""One training loop (common.training.fit) and one accuracy loop (common.training.accuracy) for the
clients (edge_client.train) and the evaluator (common.evaluate): the numbers they gave before the
loops were merged, on fixed seeds, must not move.

REFERENCE was recorded with the two separate loops (commit 4bd6e11, torch 2.14 CPU); on that
machine the merged loop reproduces every value bit for bit (same weight bytes too). The
tolerance only covers other CPUs' float rounding.
"""

from __future__ import annotations

import pytest
import torch

from common.datasets import get_meta, normalize
from common.evaluate import EvalConfig, evaluate_synthetic, test_accuracy, train_model
from common.models import build_model
from common.training import EpochStats, fit
from edge_client.train import evaluate_local, train_local

REFERENCE = {
 "train_local_augFalse": {
  "checksum": 73.94698525949161,
  "loss": 2.193317095438639,
  "acc": 0.2708333333333333,
  "n": 48,
  "eval_acc": 0.8333333333333334,
  "eval_loss": 1.7506370385487875
 },
 "train_local_augTrue": {
  "checksum": 71.89394080830061,
  "loss": 2.370618979136149,
  "acc": 0.16666666666666666,
  "n": 48,
  "eval_acc": 0.36666666666666664,
  "eval_loss": 2.1188493728637696
 },
 "train_model_sam_dsaTrue": {
  "checksum": 77.74084748287521,
  "epoch_losses": [
   2.9655338128407798,
   2.6107688744862876,
   2.11462140083313,
   2.1176499128341675
  ],
  "test_acc": 0.7333333333333333,
  "test_loss": 1.8003062725067138
 },
 "train_model_sam_dsaFalse": {
  "checksum": 79.39986863056924,
  "epoch_losses": [
   2.9716633955637612,
   2.4164201418558755,
   1.7032076517740886,
   1.5617177486419678
  ],
  "test_acc": 1.0,
  "test_loss": 1.4437611897786458
 },
 "train_model_sgd_dsaTrue": {
  "checksum": 48.91664432734615,
  "epoch_losses": [
   2.415132761001587,
   2.335752487182617,
   2.261958599090576,
   2.283307154973348
  ],
  "test_acc": 0.2,
  "test_loss": 2.2375988960266113
 },
 "train_model_sgd_dsaFalse": {
  "checksum": 49.857370829729916,
  "epoch_losses": [
   2.3991617361704507,
   2.3041059970855713,
   2.188666264216105,
   2.1755243142445884
  ],
  "test_acc": 0.3333333333333333,
  "test_loss": 2.1668051878611245
 },
 "evaluate_synthetic": {
  "accuracies": [
   0.4375,
   0.1875
  ],
  "test_losses": [
   2.016153653462728,
   2.253534952799479
  ],
  "seeds": [
   7829437886636254564,
   3462322709277726755
  ]
 }
}

META = get_meta("fashion-mnist")
ARCH = {"width": 8, "depth": 2}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (48, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(48) % 10


def _checksum(m: torch.nn.Module) -> float:
    return float(sum((i + 1) * p.detach().double().sum() for i, p in enumerate(m.parameters())))


def _close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, int) or (isinstance(value, list) and all(isinstance(v, int) for v in value)):
            assert got[key] == value, key  # counts and seeds: exact
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("aug", [False, True])
def test_client_training_and_evaluation_unchanged(aug: bool) -> None:
    x, y = _data()
    m = build_model(META, ARCH, seed=1)
    st = train_local(m, x, y, META, epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4, augment=aug,
                     device=torch.device("cpu"), seed=7, progress=False)
    acc, loss = evaluate_local(m, x[:30], y[:30], META, torch.device("cpu"), batch_size=7)
    _close({"checksum": _checksum(m), "loss": st.loss, "acc": st.accuracy, "n": st.num_examples, "eval_acc": acc,
            "eval_loss": loss}, REFERENCE[f"train_local_aug{aug}"])


@pytest.mark.parametrize("opt", ["sam", "sgd"])
@pytest.mark.parametrize("dsa", [True, False])
def test_evaluation_training_unchanged(opt: str, dsa: bool) -> None:
    x, y = _data()
    xs = normalize(x, META)
    m = build_model(META, ARCH, seed=2)
    losses: list[float] = []
    train_model(m, xs, y, EvalConfig(optimizer=opt, epochs=4, batch_size=16, dsa=dsa, num_models=2), seed=11,
                device="cpu", on_epoch=lambda e, l: losses.append(l))
    acc, loss = test_accuracy(m, xs[:30], y[:30], "cpu", batch_size=7)
    _close({"checksum": _checksum(m), "epoch_losses": losses, "test_acc": acc, "test_loss": loss},
           REFERENCE[f"train_model_{opt}_dsa{dsa}"])


def test_evaluate_synthetic_unchanged() -> None:
    x, y = _data()
    xs = normalize(x, META)
    r = evaluate_synthetic(xs[:20], y[:20], xs, y, lambda s: build_model(META, ARCH, seed=s),
                           EvalConfig(epochs=3, batch_size=8, num_models=2), seed=5, device="cpu", progress=False)
    _close({"accuracies": r.accuracies, "test_losses": r.test_losses, "seeds": r.seeds}, REFERENCE["evaluate_synthetic"])


def test_fit_reports_every_epoch_and_sets_the_lr_schedule() -> None:
    x, y = _data()
    xs = normalize(x, META)
    m = build_model(META, ARCH, seed=3)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    seen: list[tuple[int, float, float]] = []
    last = fit(m, xs, y, opt, epochs=3, batch_size=20, generator=torch.Generator().manual_seed(0),
               device=torch.device("cpu"), lr_at=lambda e: 0.1 / (e + 1),
               on_epoch=lambda e, s: seen.append((e, s.loss, opt.param_groups[0]["lr"])))
    assert [e for e, _, _ in seen] == [1, 2, 3]
    assert [lr for _, _, lr in seen] == pytest.approx([0.1, 0.05, 0.1 / 3])
    assert isinstance(last, EpochStats) and last.num_examples == 48 and 0 <= last.accuracy <= 1
    assert last.loss == seen[-1][1]


def test_fit_steps_once_per_batch() -> None:
    x, y = _data()
    m = build_model(META, ARCH, seed=4)
    steps: list[int] = []
    fit(m, normalize(x, META), y, torch.optim.SGD(m.parameters(), lr=0.01), epochs=2, batch_size=20,
        generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), on_step=lambda: steps.append(1))
    assert len(steps) == 2 * 3  # 48 images in batches of 20: 3 per epoch
