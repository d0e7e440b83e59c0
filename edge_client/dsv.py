"""Client side of the privacy-constrained modes.

* No model access (paper contribution 3, Fig. 3): the client trains a model on its own shard
  only, extracts Deep Support Vectors from it (DKKT alone, ``common.distill.synthesize`` with
  method ``dsv``: started from noise, so no private pixel is copied in) and uploads those
  images; its weights never leave the device.
* DP-FedAvg, client side: :func:`dp_clipping_mod` applies Flower's ``fixedclipping_mod`` to a
  train message when the server's DP wrapper asked for it (``clipping_norm`` in the config),
  and is a no-op otherwise, so one ClientApp serves both DP and plain runs.

DSVs travel as float32 *normalized* images (they live in the model's input space and are not
valid uint8 pictures); :func:`record_to_dsvs` checks what arrived before the server uses it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.datasets import DatasetMeta
from common.models import build_model
from common.records import check_dsvs
from common.scenario import Scenario
from common.distill.synthesize import DistillConfig, synthesize

__all__ = ["extract_dsvs", "dsv_seed", "dp_clipping_mod", "local_epochs"]


def dsv_seed(seed: int, partition_id: int) -> int:
    """Seed of one client's extraction (and of its local model's init): scenario seed x partition."""
    return int(np.random.SeedSequence([int(seed), int(partition_id), 0xD5F]).generate_state(1)[0])


def extract_dsvs(model: torch.nn.Module, meta: DatasetMeta, scenario: Scenario, ipc: int, seed: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """ipc DSVs per class from ``model`` (DKKT only, noise init): (x float32 CPU, y int64, info)."""
    names = {f.name for f in dataclasses.fields(DistillConfig)}
    cfg = DistillConfig(**{k: v for k, v in dataclasses.asdict(scenario.distill).items() if k in names})
    cfg.iterations = int(scenario.privacy.dsv_iterations)
    cfg.checkpoint_every = 0
    # alpha by the pipc rule would depend on a pool the client does not have: use the pipc-10 value
    # unless the scenario fixes alpha (the client's own data is its "pool").
    # theta_0: the client's local model starts from the scenario-seeded ConvNet (edge_client/app.py),
    # the reference point of the stationarity target "update" (common/distill/dkkt.py).
    init = build_model(meta, dataclasses.asdict(scenario.model), seed=scenario.seed)
    syn = synthesize("dsv", ipc=ipc, num_classes=meta.num_classes, image_shape=meta.image_shape, pipc=10,
                     safe_x=None, safe_y=None, model=model, embed_factory=None, config=cfg, seed=seed,
                     device=device, progress=False, init_model=init)
    x = syn.x.detach().to("cpu", torch.float32).contiguous()
    y = syn.y.to("cpu", torch.int64)
    check_dsvs(x, y, meta.num_classes, ipc, meta.image_shape, "extracted DSVs")
    info = {k: syn.info.get(k) for k in ("iterations_done", "wall_s", "alpha", "stopped_reason")}
    return x, y, info


def dp_clipping_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` when the server asked for client-side clipping, else a no-op."""
    configs = list(msg.content.config_records.values())
    if any(KEY_CLIPPING_NORM in c for c in configs):
        return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def local_epochs(scenario: Scenario) -> int:
    """Epochs of local-only training before extraction: same passes over the shard as FedAvg by default."""
    p, f = scenario.privacy, scenario.federation
    return int(p.local_epochs) if p.local_epochs is not None else max(1, f.rounds * f.local_epochs)
