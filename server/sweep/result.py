"""The result of one grid cell (method, ipc, pipc, seed): what the sweep records and every report reads."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CellResult"]


@dataclass
class CellResult:
    method: str
    ipc: int
    pipc: int
    accuracies: list[float]  # one per evaluation model, in [0, 1]
    mean: float
    std: float
    distill_s: float = 0.0
    eval_s: float = 0.0
    files: dict[str, str] = field(default_factory=dict)  # artifact kind -> path
    seed: int = 0  # distillation + evaluation seed of this cell (distill.seeds)
    skipped: str = ""  # non-empty: the cell could not run, and why (no accuracies then)
