"""The report figures (server/reports/plots.py, server/reports/paper_figures.py): sizes, and the numbers they draw."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from common.datasets import DatasetMeta
from server.reports.paper_figures import (COLUMN_WIDTH, MethodPoint, forest_rows, method_points, plot_accuracy_ci,
                                          plot_forest, plot_methods_by_class, plot_partition, plot_rounds)
from server.reports.plots import DPI, plot_spectra
from server.sweep.result import CellResult

RGB = DatasetMeta(name="toy-rgb", class_names=tuple(f"class{i}" for i in range(10)), channels=3,
                  height=8, width=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
GRAY = DatasetMeta(name="toy-gray", class_names=("zero", "one", "two"), channels=1,
                   height=6, width=6, mean=(0.3,), std=(0.3,))


def _read_png(path: Path) -> np.ndarray:
    assert path.exists() and path.stat().st_size > 0
    img = mpimg.imread(path)
    assert img.std() > 0.01  # something was drawn
    return img


def _px(figsize: tuple[float, float]) -> tuple[int, int]:
    return round(figsize[1] * DPI), round(figsize[0] * DPI)


def _cell(method: str, ipc: int, pipc: int, seed: int, accs: list[float]) -> CellResult:
    return CellResult(method=method, ipc=ipc, pipc=pipc, accuracies=accs, mean=sum(accs) / max(len(accs), 1), std=0.0,
                      seed=seed)


def test_method_points_are_seed_means_with_a_t_interval() -> None:
    cells = [_cell("dm", 1, 10, s, [a, a + 0.02]) for s, a in enumerate((0.50, 0.54, 0.58))]
    cells.append(_cell("dm", 1, 10, 9, []))  # a skipped-like cell without accuracies is left out
    (p,) = method_points(cells)
    # seed means 51, 55, 59 %: mean 55, sample sd 4, half width t(2) * 4 / sqrt(3)
    assert (p.seeds, p.mean) == (3, pytest.approx(55.0))
    assert p.half_width == pytest.approx(4.303 * 4.0 / 3 ** 0.5, rel=1e-9)
    (single,) = method_points([_cell("dsv", 1, 10, 0, [0.4])])
    assert single.seeds == 1 and np.isnan(single.half_width)


def test_accuracy_figure_one_pipc_and_several(tmp_path: Path) -> None:
    one = [MethodPoint(m, 1, 10, 50.0 + i, 1.0, 3) for i, m in enumerate(("dm", "dkkt_dm", "random_real"))]
    out = plot_accuracy_ci(one, tmp_path / "one.png", "test", "toy")
    assert _read_png(out).shape[:2] == _px((COLUMN_WIDTH, 2.9))  # a single column-width panel
    many = [MethodPoint(m, ipc, pipc, 40.0 + ipc, float("nan"), 1) for m in ("dm", "dsv") for ipc in (1, 10)
            for pipc in (10, 50, -1)]
    out = plot_accuracy_ci(many, tmp_path / "many.png", "validation", "toy")
    assert _read_png(out).shape[1] > _px((COLUMN_WIDTH, 2.9))[1]
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_accuracy_ci([], tmp_path / "none.png", "test", "toy")


def test_forest_rows_follow_the_paired_differences(tmp_path: Path) -> None:
    cells = []
    for seed, (a, b) in enumerate(((0.60, 0.55), (0.62, 0.56), (0.61, 0.58))):
        cells += [_cell("dkkt_dm", 1, 10, seed, [a]), _cell("dm", 1, 10, seed, [b])]
    rows = forest_rows(cells)
    assert [r[0] for r in rows] == ["dkkt_dm − dm  (ipc 1, pipc 10)"]
    label, mean, low, high, n = rows[0]
    assert n == 3 and mean == pytest.approx(100 * (0.05 + 0.06 + 0.03) / 3)
    assert low < mean < high and low > 0  # every seed favours dkkt_dm
    assert _read_png(plot_forest(rows, tmp_path / "forest.png", "toy")).shape[0] > 0
    assert forest_rows(cells[:2]) == []  # one seed: no interval, no row


def test_rounds_figure_needs_accuracy(tmp_path: Path) -> None:
    csv_path = tmp_path / "rounds.csv"
    csv_path.write_text("round,test_acc,test_loss,val_acc,train_loss,client_eval_acc\n0,0.1,2.3,0.1,,\n"
                        "1,0.7,0.8,0.71,1.1,0.72\n2,0.8,0.5,0.8,0.6,0.81\n")
    out = plot_rounds(csv_path, tmp_path / "rounds.png", "toy")
    assert out is not None and _read_png(out).shape[:2] == _px((2 * COLUMN_WIDTH + 0.4, 2.8))
    csv_path.write_text("round,test_acc\n")
    assert plot_rounds(csv_path, tmp_path / "none.png", "toy") is None


def test_partition_and_methods_figures(tmp_path: Path) -> None:
    counts = [(5, 0, 1), (0, 7, 2), (3, 3, 3), (1, 0, 9)]
    assert _read_png(plot_partition(counts, GRAY.class_names, tmp_path / "p.png", "toy")).shape[0] > 0
    gen = torch.Generator().manual_seed(0)
    sets = {m: (torch.randn(3, 1, 6, 6, generator=gen), torch.tensor([0, 1, 2]), 50.0 + i)
            for i, m in enumerate(("dm", "dkkt_dm"))}
    assert _read_png(plot_methods_by_class(sets, GRAY, tmp_path / "m.png", "toy")).shape[0] > 0


def test_spectra(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    spectra = {name: torch.rand(16, 16, generator=gen) * k for k, name in enumerate(("real", "dm", "dsv"), 1)}
    out = plot_spectra(spectra, tmp_path / "fft.png", figsize=(10.0, 3.4))
    assert _read_png(out).shape[:2] == _px((10.0, 3.4))
    with pytest.raises(ValueError, match="H x W"):
        plot_spectra({"bad": torch.zeros(2, 4, 4)}, tmp_path / "bad.png")
