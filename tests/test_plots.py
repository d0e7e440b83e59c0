"""Tests for server/reports/plots.py (report figures)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from common.datasets import DatasetMeta
from server.reports.plots import DPI, plot_accuracy_vs_pipc, plot_federated_curve, plot_spectra

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


def test_accuracy_vs_pipc(tmp_path: Path) -> None:
    rows = []
    for method, base in (("dm", 0.25), ("dkkt_dm", 0.28), ("dsv", 0.2)):
        for ipc in (1, 10):
            for pipc in (10, 50, "all"):
                rows.append({"method": method, "ipc": ipc, "pipc": pipc, "mean": base + 0.01 * ipc, "std": 0.01})
    rows.append({"method": "random_real", "ipc": "10", "pipc": "50", "mean": "0.3", "std": ""})  # CSV-style strings
    out = plot_accuracy_vs_pipc(rows, tmp_path / "acc.png", figsize=(8.0, 3.6))
    assert _read_png(out).shape[:2] == _px((8.0, 3.6))
    with pytest.raises(ValueError, match="no rows"):
        plot_accuracy_vs_pipc([], tmp_path / "none.png")
    with pytest.raises(ValueError, match="lack keys"):
        plot_accuracy_vs_pipc([{"method": "dm"}], tmp_path / "bad.png")


def test_federated_curve(tmp_path: Path) -> None:
    out = plot_federated_curve([0, 1, 2, 3], [0.1, 0.3, 0.42, 0.5], tmp_path / "fl" / "curve.png")
    assert _read_png(out).shape[:2] == _px((6.4, 4.0))
    with pytest.raises(ValueError, match="3 rounds but 2"):
        plot_federated_curve([1, 2, 3], [0.1, 0.2], tmp_path / "bad.png")


def test_spectra(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    spectra = {name: torch.rand(16, 16, generator=gen) * k for k, name in enumerate(("real", "dm", "dsv"), 1)}
    out = plot_spectra(spectra, tmp_path / "fft.png", figsize=(10.0, 3.4))
    assert _read_png(out).shape[:2] == _px((10.0, 3.4))
    with pytest.raises(ValueError, match="H x W"):
        plot_spectra({"bad": torch.zeros(2, 4, 4)}, tmp_path / "bad.png")
