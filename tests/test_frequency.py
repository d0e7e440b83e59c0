"""Tests for server/reports/frequency.py (Fig. 3 spectra and band-energy ratios)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from server.reports.frequency import band_energy_ratio, frequency_table, mean_log_spectrum, radial_frequency


def _checkerboard(n: int = 2, c: int = 3, size: int = 16) -> torch.Tensor:
    idx = torch.arange(size)
    board = ((idx[:, None] + idx[None, :]) % 2).float()  # 0/1 alternating
    return board.expand(n, c, size, size).clone()


def test_constant_image_has_all_energy_at_dc() -> None:
    x = torch.full((2, 3, 16, 16), 0.7)
    low, high = band_energy_ratio(x)
    assert low == pytest.approx(1.0, abs=1e-9)
    assert high == pytest.approx(0.0, abs=1e-9)
    spec = mean_log_spectrum(x)
    assert spec.shape == (16, 16)
    assert torch.argmax(spec).item() == 8 * 16 + 8  # DC at the centre after fftshift
    assert spec[8, 8].item() == pytest.approx(math.log1p(0.7 * 256), rel=1e-5)
    others = spec.clone()
    others[8, 8] = 0.0
    assert others.abs().max().item() < 1e-4


def test_checkerboard_is_dominated_by_high_frequency() -> None:
    signed = _checkerboard() * 2 - 1  # +-1, zero mean: all energy at the Nyquist corner
    low, high = band_energy_ratio(signed)
    assert high == pytest.approx(1.0, abs=1e-9) and low == pytest.approx(0.0, abs=1e-9)
    # 0/1 board: half the energy is the DC term (counted as low) unless the mean is removed.
    low01, high01 = band_energy_ratio(_checkerboard())
    assert low01 == pytest.approx(0.5, abs=1e-9) and high01 == pytest.approx(0.5, abs=1e-9)
    assert band_energy_ratio(_checkerboard(), remove_mean=True)[1] == pytest.approx(1.0, abs=1e-9)


def test_smoothing_raises_low_high_ratio() -> None:
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(8, 3, 32, 32, generator=gen)
    smooth = F.interpolate(F.avg_pool2d(noise, 4), scale_factor=4, mode="nearest")
    (noise_row, smooth_row) = frequency_table({"noise": noise, "smooth": smooth})
    assert noise_row["set"] == "noise" and smooth_row["set"] == "smooth"
    assert smooth_row["low_high_ratio"] > 5 * noise_row["low_high_ratio"]
    # White noise spreads energy evenly: low share ~ area of the disc r <= 0.25 (~pi/64 of bins).
    assert noise_row["low_energy"] == pytest.approx(math.pi / 64, abs=0.03)
    for row in (noise_row, smooth_row):
        assert row["low_energy"] + row["high_energy"] == pytest.approx(1.0)
        assert row["low_high_ratio"] == pytest.approx(row["low_energy"] / row["high_energy"])


def test_frequency_table_edge_cases() -> None:
    rows = frequency_table({"flat": torch.ones(1, 1, 8, 8), "flat_centered": torch.ones(1, 1, 8, 8)}, remove_mean=False)
    assert rows[0]["low_high_ratio"] > 1e6  # (almost) no high-frequency energy
    rows = frequency_table({"flat": torch.ones(1, 1, 8, 8)}, remove_mean=True)
    assert math.isnan(rows[0]["low_energy"]) and math.isnan(rows[0]["low_high_ratio"])


def test_spectrum_peak_matches_sinusoid_frequency() -> None:
    cols = torch.arange(32).float()
    wave = torch.cos(2 * math.pi * 4 * cols / 32).expand(1, 1, 32, 32)  # 4 cycles along x
    spec = mean_log_spectrum(wave)
    peaks = torch.topk(spec.flatten(), 2).indices.tolist()
    assert sorted(peaks) == [16 * 32 + 12, 16 * 32 + 20]  # centre row, columns 16 -+ 4


def test_radius_definition() -> None:
    r = radial_frequency(16, 16)
    assert r[8, 8].item() == 0.0
    assert r[0, 0].item() == pytest.approx(math.sqrt(2.0))  # (-0.5, -0.5) cycles/px = Nyquist corner
    assert r[8, 0].item() == pytest.approx(1.0)
    assert r[8, 10].item() == pytest.approx(0.25)  # 2/16 cycles/px = 0.25 x Nyquist


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="N x C x H x W"):
        mean_log_spectrum(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="cutoff"):
        band_energy_ratio(torch.zeros(1, 1, 4, 4), cutoff=0.0)
    assert mean_log_spectrum(torch.ones(3, 8, 8)).shape == (8, 8)  # a single C x H x W image is accepted
