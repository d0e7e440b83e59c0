"""Unit costs behind scenarios/README.md's cost table: seconds per distillation iteration and per
evaluation epoch, by dataset shape, method and ipc (random data of the right shape; cost does not
depend on the pixel values). Prints one JSON line per measurement.

    python bench/sweep_costs.py [--device cpu|cuda] [--width 128] [--ipc 1,10,50] [--datasets cifar10,fashion-mnist]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.datasets import get_meta  # noqa: E402
from common.models import build_model  # noqa: E402
from common.distill.synthesize import DistillConfig, make_embed_factory, synthesize  # noqa: E402
from common.evaluate import EvalConfig, evaluate_synthetic  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--ipc", default="1,10,50")
    p.add_argument("--methods", default="dm,dkkt_dm,dsv")
    p.add_argument("--datasets", default="fashion-mnist,cifar10")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--real-batch", type=int, default=256)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--test", type=int, default=10000, help="test images evaluated after training")
    a = p.parse_args()
    dev = torch.device(a.device)
    print(json.dumps({"env": True, "device": str(dev), "threads": torch.get_num_threads(),
                      "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None}), flush=True)
    for ds in a.datasets.split(","):
        meta = get_meta(ds)
        arch = {"width": a.width}
        model = build_model(meta, arch, seed=0).to(dev).eval()
        theta0 = build_model(meta, arch, seed=1)  # theta_0 of the stationarity target
        embed = make_embed_factory(meta, arch)
        pipc = 50
        g = torch.Generator().manual_seed(0)
        safe_x = torch.randn(pipc * meta.num_classes, *meta.image_shape, generator=g)
        safe_y = torch.arange(meta.num_classes).repeat_interleave(pipc)
        test_x = torch.randn(a.test, *meta.image_shape, generator=g)
        test_y = torch.arange(a.test) % meta.num_classes
        for ipc in (int(v) for v in a.ipc.split(",")):
            for method in a.methods.split(","):
                times = []
                for iters in (1, 1 + a.iters):  # difference removes the fixed setup cost
                    cfg = DistillConfig(iterations=iters, real_batch=a.real_batch)
                    _sync(dev)
                    t0 = time.perf_counter()
                    syn = synthesize(method, ipc=ipc, num_classes=meta.num_classes, image_shape=meta.image_shape,
                                     pipc=pipc, safe_x=safe_x, safe_y=safe_y, model=model, embed_factory=embed,
                                     config=cfg, seed=0, device=dev, progress=False, init_model=theta0)
                    _sync(dev)
                    times.append(time.perf_counter() - t0)
                print(json.dumps({"dataset": ds, "kind": "distill_iter", "method": method, "ipc": ipc,
                                  "s_per_iter": round((times[1] - times[0]) / a.iters, 4)}), flush=True)
            times = []
            for epochs in (1, 1 + a.epochs):
                ecfg = EvalConfig(epochs=epochs, num_models=1)
                _sync(dev)
                t0 = time.perf_counter()
                evaluate_synthetic(syn.x, syn.y, test_x, test_y, lambda s: build_model(meta, arch, seed=s), ecfg,
                                   seed=0, device=dev, progress=False)
                _sync(dev)
                times.append(time.perf_counter() - t0)
            print(json.dumps({"dataset": ds, "kind": "eval_epoch", "ipc": ipc, "optimizer": "sam",
                              "s_per_epoch_per_model": round((times[1] - times[0]) / a.epochs, 4),
                              "s_test_pass": round(times[0] - (times[1] - times[0]) / a.epochs, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
