"""Frequency-domain analysis of image sets (paper Fig. 3: DSVs are low-frequency, DM images high).

Definitions (all per image and per channel, then pooled over the set):

* Spectrum: ``F = fft2(x)`` over (H, W), unnormalized (torch's "backward" norm), shifted with
  ``fftshift`` so that the DC term sits at the centre (row H//2, column W//2).
* Mean log spectrum: mean over images and channels of ``log(1 + |F|)``.
* Radius: with per-axis frequencies ``fy, fx`` in cycles/pixel (``torch.fft.fftfreq``,
  range [-0.5, 0.5)), the normalized radius is ``r = sqrt(fy^2 + fx^2) / 0.5``, i.e. in units
  of the Nyquist frequency: r = 0 at DC, r = 1 at Nyquist along one axis, r = sqrt(2) in
  the corners.
* Band energy: the spectral energy is ``|F|^2`` (Parseval: proportional to the pixel energy)
  summed over all images and channels. ``low = energy(r <= cutoff) / total``,
  ``high = energy(r > cutoff) / total``, so ``low + high = 1``. DC counts as low.
  With ``remove_mean=True`` the per-image, per-channel mean is subtracted first (DC = 0),
  so only spatial structure is compared, not overall brightness.

Images are analysed in whatever space they are given (normalized synthetic images are the
natural input). No Flower imports.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "mean_log_spectrum",
    "radial_frequency",
    "band_energy_ratio",
    "frequency_table",
]


def _as_images(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if x.dim() == 3:  # a single C x H x W image
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"expected images N x C x H x W (N > 0), got shape {tuple(x.shape)}")
    return x.detach().float()


def _shifted_fft(x: Tensor) -> Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x, dim=(-2, -1)), dim=(-2, -1))


@torch.no_grad()
def mean_log_spectrum(x: Tensor) -> Tensor:
    """Mean over images and channels of ``log(1 + |fftshift(fft2(x))|)``: an H x W CPU tensor, DC centred."""
    x = _as_images(x)
    return torch.log1p(_shifted_fft(x).abs()).mean(dim=(0, 1)).cpu()


def radial_frequency(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """H x W radius (in units of Nyquist) of each fftshift-ed frequency bin; 0 at the centre (DC)."""
    fy = torch.fft.fftshift(torch.fft.fftfreq(height, device=device))
    fx = torch.fft.fftshift(torch.fft.fftfreq(width, device=device))
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5


@torch.no_grad()
def band_energy_ratio(x: Tensor, cutoff: float = 0.25, remove_mean: bool = False) -> tuple[float, float]:
    """Fractions (low, high) of spectral energy at radius <= / > ``cutoff`` x Nyquist.

    See the module docstring for the exact definition. Returns (nan, nan) when the set has
    no energy at all (e.g. constant images with ``remove_mean=True``).
    """
    if not (isinstance(cutoff, (int, float)) and 0.0 < cutoff <= math.sqrt(2.0)):
        raise ValueError(f"cutoff must be in (0, sqrt(2)] (units of Nyquist), got {cutoff!r}")
    x = _as_images(x)
    if remove_mean:
        x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = (_shifted_fft(x).abs() ** 2).double().sum(dim=(0, 1))  # H x W
    radius = radial_frequency(x.shape[-2], x.shape[-1], device=power.device)
    total = float(power.sum())
    if total <= 0.0:
        return float("nan"), float("nan")
    low_mask = radius <= cutoff
    return float(power[low_mask].sum()) / total, float(power[~low_mask].sum()) / total


def frequency_table(
    sets: dict[str, Tensor], cutoff: float = 0.25, remove_mean: bool = False
) -> list[dict[str, float | str]]:
    """One row per set: {set, low_energy, high_energy, low_high_ratio} (ratio = inf if high == 0)."""
    rows: list[dict[str, float | str]] = []
    for name, x in sets.items():
        low, high = band_energy_ratio(x, cutoff=cutoff, remove_mean=remove_mean)
        if math.isnan(low):
            ratio = float("nan")
        else:
            ratio = low / high if high > 0.0 else float("inf")
        rows.append({"set": name, "low_energy": low, "high_energy": high, "low_high_ratio": ratio})
    return rows
