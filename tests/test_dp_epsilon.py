"""epsilon of a DP-FedAvg run from Flower's RDP accountant, checked against the exact privacy curve of the
Gaussian mechanism (Balle & Wang 2018, Theorem 8) and the classical RDP conversion (Mironov 2017)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from common.scenario import load_scenario
from server.federation.dp import dp_epsilon, dp_summary

ROOT = Path(__file__).resolve().parents[1]


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _exact_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon of a mu-GDP mechanism (a Gaussian mechanism of sensitivity 1 and noise sigma
    composed T times has mu = sqrt(T) / sigma): delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    def delta_at(eps: float) -> float:
        return _phi(-eps / mu + mu / 2) - math.exp(eps) * _phi(-eps / mu - mu / 2)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


def _classical_rdp_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """min over orders a of T a / (2 sigma^2) + log(1/delta) / (a - 1): the bound RDP accountants improve on."""
    return min(rounds * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1) for a in (1 + i / 100 for i in range(1, 20000)))


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 1), (2.0, 10), (5.0, 100)])
def test_epsilon_lies_between_the_exact_gaussian_curve_and_the_classical_rdp_bound(sigma: float, rounds: int) -> None:
    pytest.importorskip("dp_accounting", reason="Flower's RdpAccountant needs flwr[dp] (pyproject dependency)")
    delta = 1e-5
    eps, how = dp_epsilon(sigma, rounds, 4, delta)
    exact = _exact_epsilon(math.sqrt(rounds) / sigma, delta)
    classical = _classical_rdp_epsilon(sigma, rounds, delta)
    assert exact < eps <= classical + 1e-6, (exact, eps, classical)
    assert eps < 1.2 * exact  # RDP is a tight upper bound for the Gaussian mechanism, not an order off
    assert "RdpAccountant" in how and f"{rounds} Gaussian releases" in how


def test_the_classical_gaussian_calibration_holds() -> None:
    # Dwork & Roth, Theorem A.1: sigma = sqrt(2 ln(1.25 / delta)) / eps gives (eps, delta)-DP for eps < 1, so the
    # exact curve above must give at most 0.5 there, and the accountant's bound stays near it
    pytest.importorskip("dp_accounting", reason="Flower's RdpAccountant needs flwr[dp] (pyproject dependency)")
    sigma = math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5
    exact = _exact_epsilon(1 / sigma, 1e-5)
    assert 0.3 < exact <= 0.5
    eps, _ = dp_epsilon(sigma, 1, 4, 1e-5)
    assert exact < eps < 0.5


def test_rounds_compose_as_rdp_says() -> None:
    pytest.importorskip("dp_accounting", reason="Flower's RdpAccountant needs flwr[dp] (pyproject dependency)")
    # T releases at sigma have the RDP curve of one release at sigma / sqrt(T)
    many, _ = dp_epsilon(4.0, 16, 4, 1e-5)
    one, _ = dp_epsilon(1.0, 1, 4, 1e-5)
    assert many == pytest.approx(one, rel=2e-2)
    assert dp_epsilon(4.0, 32, 4, 1e-5)[0] > many  # more rounds, more epsilon


def test_no_noise_is_no_privacy_and_missing_accountant_is_said(monkeypatch: pytest.MonkeyPatch) -> None:
    assert dp_epsilon(0.0, 2, 4, 1e-5) == (math.inf, "no noise: no differential privacy")
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # what an install without flwr[dp] sees
    eps, how = dp_epsilon(1.0, 2, 4, 1e-5)
    assert eps is None and 'pip install "flwr[dp]"' in how


def test_dp_scenario_summary_carries_epsilon_for_its_rounds_and_delta() -> None:
    pytest.importorskip("dp_accounting", reason="Flower's RdpAccountant needs flwr[dp] (pyproject dependency)")
    s = load_scenario(ROOT / "scenarios" / "dp.yaml", overrides={"privacy.dp.noise_multiplier": 1.0,
                                                                  "privacy.dp.delta": 1e-6})
    summary = dp_summary(s, 4)
    assert summary["rounds"] == 2 and summary["delta"] == 1e-6
    assert summary["epsilon"] == pytest.approx(dp_epsilon(1.0, 2, 4, 1e-6)[0])
    assert dp_summary(s, 4, rounds=1)["epsilon"] < summary["epsilon"]  # the rounds that ran, when fewer
