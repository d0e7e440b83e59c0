"""``privacy.dp`` (mode ``model``): FedAvg wrapped in Flower's
``DifferentialPrivacyServerSideFixedClipping`` (the server clips each update to
``clipping_norm`` and adds Gaussian noise of stdev ``noise_multiplier * clipping_norm / N``
to the average) or ``DifferentialPrivacyClientSideFixedClipping`` (clients clip with
``fixedclipping_mod``, see edge_client/dsv.py; the server adds the noise).

The privacy budget (:func:`dp_epsilon`) comes from Flower's ``RdpAccountant`` (flwr[dp], Google's
dp-accounting): every client takes part in every round, so each round is one Gaussian release of
noise multiplier ``noise_multiplier`` without sampling amplification, for client-level DP (adding
or removing one client); ``rounds`` releases compose. The wrappers' own accounting cannot be
used: it needs FedAvg's aggregate_train unchanged and equal client weights.
"""

from __future__ import annotations

import math
from logging import INFO

from flwr.common.logger import log
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from common.scenario import Scenario

__all__ = ["dp_wrap", "dp_summary", "dp_epsilon"]


def dp_wrap(strategy: Strategy, scenario: Scenario, num_clients: int) -> Strategy:
    """``strategy`` wrapped in Flower's fixed-clipping DP wrapper when ``privacy.dp.enabled``."""
    dp = scenario.privacy.dp
    if not dp.enabled:
        return strategy
    cls = DifferentialPrivacyServerSideFixedClipping if dp.side == "server" else DifferentialPrivacyClientSideFixedClipping
    log(INFO, "federate: DP-FedAvg (%s-side fixed clipping, clipping norm %g, noise multiplier %g, %d clients)",
        dp.side, dp.clipping_norm, dp.noise_multiplier, num_clients)
    return cls(strategy, noise_multiplier=float(dp.noise_multiplier), clipping_norm=float(dp.clipping_norm),
               num_sampled_clients=int(num_clients))


def dp_epsilon(noise_multiplier: float, rounds: int, num_clients: int, delta: float) -> tuple[float | None, str]:
    """(epsilon, how it was computed) of ``rounds`` DP-FedAvg rounds in which all ``num_clients`` clients take
    part, at ``delta``; epsilon is inf without noise and None when Flower's accountant is not installed."""
    if noise_multiplier <= 0:
        return math.inf, "no noise: no differential privacy"
    if rounds <= 0:
        return 0.0, "no round released a model"
    try:
        from flwr.serverapp import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant,
                                    SamplingMethod)

        accountant = RdpAccountant(PrivacyConfig(
            target_delta=delta, population_size=num_clients, neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
    except ImportError:  # RdpAccountant needs dp-accounting (pip install "flwr[dp]")
        return None, 'not computed: Flower\'s RDP accountant needs dp-accounting (pip install "flwr[dp]")'
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=float(noise_multiplier), sample_size=num_clients,
                                            population_size=num_clients), count=rounds)
    spent = accountant.get_privacy_spent(delta)
    return spent.epsilon, (f"Flower's RdpAccountant: client-level (add or remove one client), {rounds} Gaussian "
                           f"releases of noise multiplier {noise_multiplier:g}, every client in every round (no "
                           f"sampling amplification), RDP order {spent.optimal_order:g}")


def dp_summary(scenario: Scenario, num_clients: int | None, rounds: int | None = None) -> dict:
    """What the run's report says about DP (empty dict when DP is off); ``rounds``: the FedAvg rounds that ran
    (default federation.rounds)."""
    dp = scenario.privacy.dp
    if not dp.enabled:
        return {}
    n = num_clients or scenario.federation.num_clients
    rounds = scenario.federation.rounds if rounds is None else rounds
    stdev = dp.noise_multiplier * dp.clipping_norm / n if n else None
    epsilon, accounting = dp_epsilon(dp.noise_multiplier, rounds, n, dp.delta) if n else (None, "client count unknown")
    return {"side": dp.side, "clipping_norm": dp.clipping_norm, "noise_multiplier": dp.noise_multiplier,
            "num_clients": n, "noise_stdev": stdev, "rounds": rounds, "delta": dp.delta, "epsilon": epsilon,
            "accounting": accounting,
            "wrapper": ("DifferentialPrivacyServerSideFixedClipping" if dp.side == "server"
                        else "DifferentialPrivacyClientSideFixedClipping + fixedclipping_mod")}
