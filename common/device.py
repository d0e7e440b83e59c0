"""Device selection shared by the server, the clients and the tools.

``pick_device("auto")`` picks CUDA when it is available and the CPU otherwise.
Explicit specs ("cpu", "cuda", "cuda:1") are checked, so a scenario that asks
for a GPU on a machine without one fails at start-up with a clear message
instead of deep inside the first ``.to(device)``.
"""

from __future__ import annotations

import re

import torch

__all__ = ["pick_device"]

_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def pick_device(spec: str | torch.device = "auto") -> torch.device:
    """Return the ``torch.device`` described by ``spec``.

    Accepted specs: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``,
    ``"cuda"`` and ``"cuda:N"``; a ``torch.device`` is checked the same way.
    Raises ``ValueError`` for an unknown spec, or when CUDA (or the given CUDA
    index) is asked for but not available.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str):
        raise ValueError(f"device: expected a string such as 'auto', 'cpu', 'cuda' or 'cuda:0', got {spec!r}")
    text = spec.strip().lower()
    if text in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA_RE.match(text)
    if match is None:
        raise ValueError(f"device: unknown device {spec!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device: {spec!r} was requested but CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); use device: auto or device: cpu"
        )
    if match.group(1) is None:
        return torch.device("cuda")
    index = int(match.group(1))
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(
            f"device: {spec!r} was requested but only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})"
        )
    return torch.device("cuda", index)
