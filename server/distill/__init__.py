"""Dataset distillation on the server: DM (Eq. 2), Deep-KKT (Eq. 3-4) and their sum (Eq. 5).

Plain tensors and modules only (no Flower imports), so a distillation runs from cached
artifacts too: ``python -m server.distill --help``.
"""

from server.distill.dkkt import dkkt_loss, primal_loss, stationarity_loss
from server.distill.dm import dm_loss
from server.distill.synthesize import (
    METHODS,
    DistillationError,
    DistillConfig,
    SyntheticSet,
    default_alpha,
    default_gamma,
    default_init,
    make_embed_factory,
    synthesize,
)

__all__ = [
    "METHODS",
    "DistillConfig",
    "DistillationError",
    "SyntheticSet",
    "default_alpha",
    "default_gamma",
    "default_init",
    "dkkt_loss",
    "dm_loss",
    "make_embed_factory",
    "primal_loss",
    "stationarity_loss",
    "synthesize",
]
