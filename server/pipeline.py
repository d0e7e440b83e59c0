"""Phases 3-5 (distill, evaluate, report) on plain tensors: no Flower here.

Input: the trained global model theta*, the pooled safe set T' (uint8, class-major, each
class in a fixed seeded order), the test split. For every (pipc, ipc, method) of the
scenario grid: ``server.distill.synthesize`` on the first ``pipc`` images per class of T'
(smaller pools are nested subsets of larger ones), then
``server.evaluate.evaluate_synthetic`` (fresh ConvNets trained on S, tested on the test
split). Results, synthetic sets and image grids go to the run folder.

Also runnable without Flower, from a finished run's artifacts::

    python -m server.pipeline scenarios/quickstart.yaml --reuse runs/quickstart
"""

from __future__ import annotations

import os

# Before torch loads: libgomp's default busy-waiting makes torch 5-25x slower when the CPU is
# oversubscribed (server + simulated clients + anything else on a few cores). Override by exporting it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path

import torch
from flwr.common.logger import log  # logging only (plain python logger); no Flower objects

from common.datasets import DatasetMeta, normalize
from common.device import pick_device
from common.models import build_model
from common.scenario import Scenario, load_scenario, save_resolved
from server.artifacts import load_model_artifact, load_safe_artifact, save_synthetic_artifact
from server.collect import pool_subset
from server.distill.synthesize import DistillConfig, SyntheticSet, make_embed_factory, synthesize
from server.evaluate import EvalConfig, evaluate_synthetic
from server.images import save_image_grid
from server.plots import plot_federated_curve
from server.report import CellResult, print_summary, upload_summary, write_results, write_rounds, write_timings, write_uploads

__all__ = ["PipelineInputs", "distill_config", "eval_config", "run_grid", "run_pipeline", "load_reused", "main"]


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


def _section_to(cls: type, section: object) -> object:
    """Copy the scenario section's fields that ``cls`` knows (names match by contract)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dataclasses.asdict(section).items() if k in names})


def distill_config(scenario: Scenario) -> DistillConfig:
    return _section_to(DistillConfig, scenario.distill)  # type: ignore[return-value]


def eval_config(scenario: Scenario) -> EvalConfig:
    return _section_to(EvalConfig, scenario.evaluation)  # type: ignore[return-value]


def _cell_name(method: str, ipc: int, pipc: int) -> str:
    return f"{method}_ipc{ipc}_pipc{pipc}"


def run_grid(inp: PipelineInputs, progress: bool | None = None) -> list[CellResult]:
    """Distill and evaluate every (pipc, ipc, method) cell of the scenario."""
    s, meta, dev = inp.scenario, inp.meta, inp.device
    progress = sys.stderr.isatty() if progress is None else progress
    arch = dataclasses.asdict(s.model)
    model = build_model(meta, arch)
    model.load_state_dict(inp.model_state)
    model.eval()
    test_x = normalize(inp.test_x, meta)
    dcfg, ecfg = distill_config(s), eval_config(s)
    embed_factory = make_embed_factory(meta, arch)
    syn_dir, img_dir = inp.run_dir / "synthetic", inp.run_dir / "images"

    def model_factory(seed: int) -> torch.nn.Module:
        return build_model(meta, arch, seed=seed)

    cells: list[CellResult] = []
    for pipc in s.distill.pipc:
        safe_x = safe_y = None
        if pipc > 0:
            sub_x, safe_y = pool_subset(inp.pool_x, inp.pool_y, pipc, meta.num_classes)
            safe_x = normalize(sub_x, meta)
        for ipc in s.distill.ipc:
            done: dict[str, SyntheticSet] = {}
            for method in s.distill.methods:
                name = _cell_name(method, ipc, pipc)
                t0 = time.perf_counter()
                dsv = done.get("dsv")  # blend reuses this cell's DSVs when they were distilled
                syn = synthesize(
                    method, ipc=ipc, num_classes=meta.num_classes, image_shape=meta.image_shape, pipc=pipc,
                    safe_x=safe_x, safe_y=safe_y, model=model, embed_factory=embed_factory, config=dcfg,
                    seed=s.seed, device=dev, progress=progress,
                    checkpoint_path=syn_dir / f"{name}.ckpt.pt" if dcfg.checkpoint_every else None,
                    dsv_x=dsv.x if (method == "blend" and dsv is not None) else None,
                    dsv_y=dsv.y if (method == "blend" and dsv is not None) else None,
                )
                done[method] = syn
                t1 = time.perf_counter()
                res = evaluate_synthetic(syn.x, syn.y, test_x, inp.test_y, model_factory, ecfg, seed=s.seed,
                                         device=dev, progress=progress)
                t2 = time.perf_counter()
                files = {"synthetic": str(save_synthetic_artifact(syn_dir / f"{name}.pt", syn, meta.name, pipc))}
                files["grid"] = str(img_dir / f"{name}.png")
                save_image_grid(syn.x, syn.y, files["grid"], meta, title=f"{method} ipc={ipc} pipc={pipc}")
                cells.append(CellResult(method=method, ipc=ipc, pipc=pipc, accuracies=list(res.accuracies),
                                        mean=res.mean, std=res.std, distill_s=t1 - t0, eval_s=t2 - t1, files=files))
                log(INFO, "distill+evaluate %s: %.2f ± %.2f %% (distill %.1fs, evaluate %.1fs)", name,
                    100 * res.mean, 100 * res.std, t1 - t0, t2 - t1)
    return cells


def run_pipeline(inp: PipelineInputs, progress: bool | None = None) -> list[CellResult]:
    """Phases 3+4 (the grid) and 5 (report). Returns the cells."""
    t0 = time.perf_counter()
    cells = run_grid(inp, progress)
    inp.timings["distill+evaluate"] = time.perf_counter() - t0
    log(INFO, "phase 3+4 distill+evaluate: %d cells in %.1fs", len(cells), inp.timings["distill+evaluate"])

    t0 = time.perf_counter()
    run_dir = inp.run_dir
    write_results(cells, run_dir, title=f"{inp.scenario.name}: synthetic-set test accuracy ({inp.meta.name})")
    if inp.rounds:
        write_rounds(inp.rounds, run_dir / "rounds.csv")
        plot_federated_curve([r["round"] for r in inp.rounds], [r["test_acc"] for r in inp.rounds],
                             run_dir / "rounds.png")
    if inp.weight_uploads or inp.safe_uploads:
        write_uploads(inp.weight_uploads, inp.safe_uploads, run_dir)
    if len(inp.pool_y):
        save_image_grid(normalize(inp.pool_x, inp.meta), inp.pool_y, run_dir / "images" / "safe_pool.png", inp.meta,
                        title=f"safe pool T' ({inp.scenario.pool_pipc} per class)")
    inp.timings["report"] = time.perf_counter() - t0
    write_timings(inp.timings, run_dir / "timings.json")
    log(INFO, "phase 5 report: written to %s in %.1fs", run_dir, inp.timings["report"])
    print_summary(cells, inp.rounds, upload_summary(inp.weight_uploads, inp.safe_uploads), inp.timings, run_dir)
    return cells


def load_reused(folder: str | Path, meta: DatasetMeta, scenario: Scenario) -> tuple[OrderedDict[str, torch.Tensor], torch.Tensor, torch.Tensor, dict]:
    """theta* and T' from an earlier run folder, checked against this scenario."""
    folder = Path(folder).expanduser()
    model = load_model_artifact(folder / "global_model.pt", dataset=meta.name)
    arch = dataclasses.asdict(scenario.model)
    if {k: v for k, v in model.arch.items() if k in arch} != {k: v for k, v in arch.items() if k in model.arch}:
        raise ValueError(f"{folder / 'global_model.pt'} was trained with model {model.arch}, "
                         f"but the scenario asks for {arch}")
    safe = load_safe_artifact(folder / "safe_pool.pt", meta=meta)
    counts = torch.bincount(safe.y, minlength=meta.num_classes)
    if scenario.pool_pipc > 0 and int(counts.min()) < scenario.pool_pipc:
        raise ValueError(f"{folder / 'safe_pool.pt'} holds {counts.tolist()} images per class, fewer than "
                         f"max(distill.pipc) = {scenario.pool_pipc}; collect a larger pool")
    return OrderedDict(model.state_dict), safe.x, safe.y, safe.extra


def main(argv: Sequence[str] | None = None) -> int:
    """Distill + evaluate + report from cached artifacts, without Flower."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", help="scenario YAML")
    parser.add_argument("--reuse", help="run folder with global_model.pt + safe_pool.pt (default: reuse_artifacts)")
    args = parser.parse_args(argv)
    overrides = {"reuse_artifacts": args.reuse} if args.reuse else None
    scenario = load_scenario(args.scenario, overrides=overrides)
    if not scenario.reuse_artifacts:
        parser.error("no artifacts to reuse: pass --reuse or set reuse_artifacts in the scenario")
    from edge_client.data import federation_train_set  # the same data view the federation used

    data = federation_train_set(scenario)
    state, pool_x, pool_y, _ = load_reused(scenario.reuse_artifacts, data.meta, scenario)
    run_dir = scenario.run_dir
    save_resolved(scenario, run_dir)
    run_pipeline(PipelineInputs(scenario=scenario, meta=data.meta, model_state=state, pool_x=pool_x, pool_y=pool_y,
                                test_x=data.test_x, test_y=data.test_y, run_dir=run_dir,
                                device=pick_device(scenario.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
