"""``privacy.dp`` (mode ``model``): FedAvg wrapped in Flower's
``DifferentialPrivacyServerSideFixedClipping`` (the server clips each update to
``clipping_norm`` and adds Gaussian noise of stdev ``noise_multiplier * clipping_norm / N``
to the average) or ``DifferentialPrivacyClientSideFixedClipping`` (clients clip with
``fixedclipping_mod``, see edge_client/dsv.py; the server adds the noise).
"""

from __future__ import annotations

from logging import INFO

from flwr.common.logger import log
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from common.scenario import Scenario

__all__ = ["dp_wrap", "dp_summary"]


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


def dp_summary(scenario: Scenario, num_clients: int | None) -> dict:
    """What the run's report says about DP (empty dict when DP is off)."""
    dp = scenario.privacy.dp
    if not dp.enabled:
        return {}
    n = num_clients or scenario.federation.num_clients
    stdev = dp.noise_multiplier * dp.clipping_norm / n if n else None
    return {"side": dp.side, "clipping_norm": dp.clipping_norm, "noise_multiplier": dp.noise_multiplier,
            "num_clients": n, "noise_stdev": stdev, "rounds": scenario.federation.rounds,
            "wrapper": ("DifferentialPrivacyServerSideFixedClipping" if dp.side == "server"
                        else "DifferentialPrivacyClientSideFixedClipping + fixedclipping_mod")}
