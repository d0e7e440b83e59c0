"""Tests for server/reports/stats.py (pooled mean/std, paired difference and its t-interval)."""

from __future__ import annotations

import math

import pytest

from server.reports.stats import paired_difference, pooled, t_quantile_975


def test_pooled_is_over_every_model_of_every_seed() -> None:
    mean, std, n = pooled({0: [0.5, 0.7], 1: [0.6]})
    assert n == 3 and mean == pytest.approx(0.6)
    assert std == pytest.approx(math.sqrt((0.01 + 0.01 + 0) / 3))


def test_paired_difference_hand_computed() -> None:
    a = {0: [0.60, 0.62], 1: [0.70], 2: [0.65, 0.65]}
    b = {0: [0.58, 0.60], 1: [0.66], 2: [0.64, 0.64], 3: [0.9]}  # seed 3 has no partner: ignored
    d = paired_difference(a, b)
    assert d.per_seed == pytest.approx({0: 0.02, 1: 0.04, 2: 0.01})
    mean = (0.02 + 0.04 + 0.01) / 3
    sd = math.sqrt(((0.02 - mean) ** 2 + (0.04 - mean) ** 2 + (0.01 - mean) ** 2) / 2)
    assert d.mean == pytest.approx(mean)
    assert d.half_width == pytest.approx(4.303 * sd / math.sqrt(3))
    assert d.low < 0 < d.high and d.verdict() == "no significant difference"  # 0.0233 ± 0.038
    tight = paired_difference({0: [0.62], 1: [0.63], 2: [0.64]}, {0: [0.60], 1: [0.61], 2: [0.62]})
    assert tight.half_width == pytest.approx(0.0, abs=1e-12) and tight.verdict() == "A better"
    assert paired_difference(b, a).verdict() == "no significant difference"


def test_interval_crossing_zero_is_no_difference_and_one_seed_has_no_interval() -> None:
    d = paired_difference({0: [0.5], 1: [0.6]}, {0: [0.55], 1: [0.55]})
    assert d.mean == pytest.approx(0.0) and d.verdict() == "no significant difference"
    one = paired_difference({0: [0.5]}, {0: [0.4]})
    assert one.mean == pytest.approx(0.1) and math.isnan(one.half_width)
    assert one.verdict() == "too few seeds for an interval"


def test_t_quantiles() -> None:
    assert t_quantile_975(2) == pytest.approx(4.303)
    assert t_quantile_975(1000) == pytest.approx(1.96)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_results_markdown_reports_the_paired_difference_over_seeds() -> None:
    from server.reports.tables import results_markdown
    from server.sweep.result import CellResult

    cells = [CellResult(method=m, ipc=1, pipc=10, seed=s, accuracies=[a, a], mean=a, std=0.0)
             for s, (d, k) in enumerate([(0.60, 0.63), (0.61, 0.65), (0.62, 0.66)])
             for m, a in (("dm", d), ("dkkt_dm", k))]
    md = results_markdown(cells)
    row = next(line for line in md.splitlines() if line.startswith("| 1 | 10 | dkkt_dm − dm |"))
    # per-seed differences +3, +4, +4 points: mean 3.67, sd 0.577, CI 3.67 ± 4.303 * 0.577 / sqrt(3)
    assert "0: +3.00, 1: +4.00, 2: +4.00" in row and "+3.67" in row
    assert "[+2.23, +5.10]" in row and "dkkt_dm better" in row
    single = [c for c in cells if c.seed == 0]
    assert "Paired differences" not in results_markdown(single)
