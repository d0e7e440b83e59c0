"""What phases 3-5 start from: theta*, the safe pool T', the test split and the phase 1-2 records
(built by the ServerApp after federating, or read back from a run folder)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.datasets import DatasetMeta
from common.scenario import Scenario

__all__ = ["PipelineInputs"]


@dataclass
class PipelineInputs:
    scenario: Scenario
    meta: DatasetMeta
    model_state: OrderedDict[str, torch.Tensor]
    pool_x: torch.Tensor  # uint8 safe pool, class-major, seeded order within a class
    pool_y: torch.Tensor
    test_x: torch.Tensor  # uint8
    test_y: torch.Tensor
    run_dir: Path
    device: torch.device
    rounds: list[dict] = field(default_factory=list)  # phase 1 history (empty when reused)
    weight_uploads: list[dict] = field(default_factory=list)
    safe_uploads: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    client_dsvs: object | None = None  # no_model_access: server.federation.modes.ClientDSVs (model_state is then None)
    dsv_uploads: list[dict] = field(default_factory=list)
