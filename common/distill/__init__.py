"""The distillation engine: DM (Eq. 2), Deep-KKT (Eq. 3-4) and their sum (Eq. 5).

Plain tensors and modules only (no Flower, no app imports): the server's pipeline, the
clients' DSV extraction (privacy.mode no_model_access) and the offline CLI
(``python -m server.distill --help``) all run it.
"""

from common.distill.dkkt import dkkt_loss, primal_loss, stationarity_loss
from common.distill.dm import dm_loss
from common.distill.synthesize import (
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
