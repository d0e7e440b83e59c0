"""Statistics for method comparisons: mean ± std over every evaluation model of every
distillation seed, and the paired difference of two methods per seed with a Student-t
confidence interval (no scipy: the t quantiles for small degrees of freedom are tabulated).

Pairing: method A and method B of the same distillation seed share that seed's safe
images, its random-network and DSA draws up to where the methods differ, and the same
evaluation-model seeds, so the per-seed difference of their mean accuracies cancels most
of the seed-to-seed variation. The interval is over the distillation seeds (n seeds ->
n - 1 degrees of freedom); the evaluation models of a seed are averaged first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

__all__ = ["PairedDiff", "REPORT_PAIRS", "t_quantile_975", "pooled", "paired_difference", "paired_rows",
           "paired_markdown"]

# Two-sided 95 % Student-t quantiles t_{0.975, df} for df = 1..30 (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}; the normal quantile 1.96 beyond the table (df > 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def pooled(accuracies_by_seed: Mapping[int, Sequence[float]]) -> tuple[float, float, int]:
    """(mean, population std, count) over every evaluation model of every seed."""
    values = [float(a) for accs in accuracies_by_seed.values() for a in accs]
    if not values:
        return float("nan"), float("nan"), 0
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return mean, std, len(values)


@dataclass(frozen=True)
class PairedDiff:
    per_seed: dict[int, float]  # seed -> mean(A) - mean(B) over that seed's evaluation models
    mean: float
    half_width: float  # 95 % CI = mean ± half_width (nan with fewer than 2 seeds)

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def verdict(self) -> str:
        """'A better', 'B better' or 'no significant difference' at the 95 % level."""
        if not math.isfinite(self.half_width):
            return "too few seeds for an interval"
        if self.low > 0:
            return "A better"
        if self.high < 0:
            return "B better"
        return "no significant difference"


def paired_difference(a: Mapping[int, Sequence[float]], b: Mapping[int, Sequence[float]]) -> PairedDiff:
    """Per distillation seed present in both: mean(a[seed]) - mean(b[seed]); their mean and
    95 % t-interval over the seeds (sample std, ddof = 1)."""
    seeds = sorted(set(a) & set(b))
    diffs = {s: sum(a[s]) / len(a[s]) - sum(b[s]) / len(b[s]) for s in seeds if len(a[s]) and len(b[s])}
    n = len(diffs)
    if n == 0:
        return PairedDiff(per_seed={}, mean=float("nan"), half_width=float("nan"))
    mean = sum(diffs.values()) / n
    if n < 2:
        return PairedDiff(per_seed=diffs, mean=mean, half_width=float("nan"))
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs.values()) / (n - 1))
    return PairedDiff(per_seed=diffs, mean=mean, half_width=t_quantile_975(n - 1) * sd / math.sqrt(n))


# (A, B) pairs a results table reports when both ran with several seeds: A - B.
REPORT_PAIRS: tuple[tuple[str, str], ...] = (("dkkt_dm", "dm"), ("dkkt_dm", "dsv"), ("dkkt_dm", "random_real"),
                                             ("dm", "random_real"))


def paired_rows(cells: Sequence[object]) -> list[tuple[int, int, str, str, PairedDiff]]:
    """(ipc, pipc, A, B, A - B) for every (ipc, pipc) and pair of ``REPORT_PAIRS`` that ran with >= 2 common
    seeds; ``cells`` are objects with method, ipc, pipc, seed, accuracies, skipped (``CellResult``)."""
    acc: dict[tuple[str, int, int], dict[int, list[float]]] = {}
    for c in cells:
        if not getattr(c, "skipped", None) and getattr(c, "accuracies", None):
            acc.setdefault((c.method, c.ipc, c.pipc), {})[c.seed] = list(c.accuracies)  # type: ignore[attr-defined]
    rows = []
    for ipc, pipc in sorted({(k[1], k[2]) for k in acc}):
        for a, b in REPORT_PAIRS:
            ka, kb = (a, ipc, pipc), (b, ipc, pipc)
            if ka in acc and kb in acc and len(set(acc[ka]) & set(acc[kb])) >= 2:
                rows.append((ipc, pipc, a, b, paired_difference(acc[ka], acc[kb])))
    return rows


def paired_markdown(cells: Sequence[object], label: Callable[[int], str] = str) -> list[str]:
    """Markdown lines: per (ipc, pipc) and method pair of ``REPORT_PAIRS``, the per-seed paired
    difference of the mean accuracy, its mean and 95 % interval (``paired_rows``); empty list
    when no pair has two seeds."""
    rows = []
    for ipc, pipc, a, b, d in paired_rows(cells):
        per = ", ".join(f"{s}: {100 * v:+.2f}" for s, v in sorted(d.per_seed.items()))
        verdict = d.verdict().replace("A better", f"{a} better").replace("B better", f"{b} better")
        rows.append(f"| {ipc} | {label(pipc)} | {a} − {b} | {per} | {100 * d.mean:+.2f} | "
                    f"[{100 * d.low:+.2f}, {100 * d.high:+.2f}] | {verdict} |")
    if not rows:
        return []
    return ["", "Paired differences (same distillation seed, same evaluation networks; points of accuracy, "
            "95 % t-interval over the seeds):", "",
            "| ipc | pipc | A − B | per seed | mean | 95 % CI | verdict |", "|---|---|---|---|---|---|---|", *rows]
