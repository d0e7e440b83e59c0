"""Device profiles: a null dm_max_batch / parallel_models takes the device's measured setting (packs of 256
and sequential models on the CPU, one DM forward and lockstep models on a GPU), states it in the resolved
scenario, and never overrides a value the user wrote."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch

from common.config import DistillConfig, profile_value
from common.distill.synthesize import make_embed_factory, synthesize
from common.scenario import apply_device_profile, scenario_from_dict


def test_null_settings_take_the_devices_profile_and_explicit_ones_stay() -> None:
    s = scenario_from_dict({"name": "p"})
    assert (s.distill.dm_max_batch, s.evaluation.parallel_models) == (None, None)
    cpu, filled = apply_device_profile(s, "cpu")
    assert (cpu.distill.dm_max_batch, cpu.evaluation.parallel_models) == (256, False)
    assert filled == {"distill.dm_max_batch": 256, "evaluation.parallel_models": False}
    gpu, _ = apply_device_profile(s, "cuda")
    assert (gpu.distill.dm_max_batch, gpu.evaluation.parallel_models) == (0, True)
    mine = scenario_from_dict({"name": "p", "distill": {"dm_max_batch": 64}, "evaluation": {"parallel_models": False}})
    kept, filled = apply_device_profile(mine, "cuda")
    assert (kept.distill.dm_max_batch, kept.evaluation.parallel_models, filled) == (64, False, {})
    assert profile_value("distill.dm_max_batch", 0, "cpu") == 0  # 0 (one forward) is a value, not "unset"


def test_the_engine_resolves_a_null_like_the_scenario(monkeypatch) -> None:
    """synthesize with dm_max_batch None on the CPU packs the DM forwards exactly as with 256."""
    syn_mod = sys.modules["common.distill.synthesize"]  # the package re-exports the function under that name
    seen: list = []
    real_dm_loss = syn_mod.dm_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("max_batch"))
        return real_dm_loss(*args, **kwargs)

    monkeypatch.setattr(syn_mod, "dm_loss", spy)
    meta = SimpleNamespace(channels=1, height=8, width=8, num_classes=2)
    g = torch.Generator().manual_seed(0)
    safe_x, safe_y = torch.randn(20, 1, 8, 8, generator=g), torch.arange(2).repeat_interleave(10)
    out = {}
    for mb in (None, 256):
        seen.clear()
        s = synthesize("dm", ipc=1, num_classes=2, image_shape=(1, 8, 8), pipc=10, safe_x=safe_x, safe_y=safe_y,
                       model=None, embed_factory=make_embed_factory(meta, {"width": 4, "depth": 1}),
                       config=DistillConfig(iterations=2, dm_max_batch=mb, real_batch=4, dsa=False),
                       seed=0, device="cpu", progress=False)
        out[mb] = (s.x.clone(), list(seen))
    assert out[None][1] == [256, 256] == out[256][1]
    assert torch.equal(out[None][0], out[256][0])
