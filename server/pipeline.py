"""Phases 3-5 (distill, evaluate, report) on plain tensors: no Flower here.

Input: the trained global model theta*, the pooled safe set T' (uint8, class-major, each
class in a fixed seeded order), the held-out split that scores the cells (``evaluation.split``:
the test split, or the validation split while tuning). For every (pipc, ipc, method, seed) of
the scenario grid: ``common.distill.synthesize`` on pipc safe images per class of T' (drawn
per seed, ``distill.safe_draw``), then ``common.evaluate.evaluate_synthetic`` (fresh ConvNets
trained on S, tested on the scoring split). Results, synthetic sets and image grids go to the
run folder.

Also runnable without Flower, from a finished run's artifacts::

    python -m server.pipeline scenarios/quickstart.yaml --reuse runs/quickstart \
        [--set evaluation.split=validation --set output_dir=runs/tuning]
"""

from __future__ import annotations

import os

# Before torch loads: libgomp's default busy-waiting makes torch 5-25x slower when the CPU is
# oversubscribed (server + simulated clients + anything else on a few cores). Override by exporting it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
import dataclasses
import functools
import time
from collections import OrderedDict
from collections.abc import Sequence
from logging import INFO
from pathlib import Path

import torch
from flwr.common.logger import log  # logging only (plain python logger); no Flower objects

from common.datasets import DatasetMeta, federation_train_set
from common.device import pick_device
from common.models import build_model
from common.scenario import (Scenario, ScenarioError, apply_device_profile, load_scenario, overrides_from_run_config,
                             save_resolved)
from common.grid import PIPC_ALL
from server.store.artifacts import ArtifactError, build_model_from_artifact, load_model_artifact, load_safe_artifact
from common.distill.synthesize import make_embed_factory
from server.reports.figures import rebuild_report
from server.reports.run_files import write_run_files
from server.reports.tables import print_summary, upload_summary, write_timings
from server.sweep.cells import run_cells
from server.sweep.inputs import PipelineInputs
from server.sweep.result import CellResult
from server.store.manifest import PHASE12_FILES, verify_files
from server.store.run_folder import RunFolder, RunFolderError, one_line
from common.threads import setup_process
from server.preflight import check_data_root

__all__ = ["PipelineInputs", "run_grid", "run_pipeline", "write_run_files",
           "load_reused", "main"]




def run_grid(inp: PipelineInputs, progress: bool | None = None) -> list[CellResult]:
    """Distill and evaluate every (pipc, ipc, seed, method) cell of the scenario (server.sweep.cells)."""
    s, meta = inp.scenario, inp.meta
    progress = True if progress is None else progress  # a bar on a terminal, else periodic log lines (common/progress.py)
    arch = dataclasses.asdict(s.model)
    model = None  # privacy.mode no_model_access: the server never holds theta*
    if inp.model_state is not None:
        model = build_model(meta, arch)
        model.load_state_dict(inp.model_state)
        model.eval()
    dcfg, ecfg = s.distill, s.evaluation  # the sections are the engine's configs (common/config.py)
    embed_factory = make_embed_factory(meta, arch)
    # theta_0: FedAvg's starting point (server/run.py), the stationarity target's reference.
    init_model = build_model(meta, arch, seed=s.seed)
    # The evaluation network is the scenario's (evaluation.width/depth), the same for every
    # method, whatever architecture theta* has.
    eval_arch = {"width": s.evaluation.width, "depth": s.evaluation.depth}

    model_factory = functools.partial(build_model, meta, eval_arch)  # seed -> evaluation net; picklable (workers)

    # server.sweep.cells: per-cell records under cells/, resume, skipped cells, seeds.
    cells = run_cells(inp, model, embed_factory, dcfg, ecfg, model_factory, progress, init_model=init_model)
    return cells


def run_pipeline(inp: PipelineInputs, progress: bool | None = None) -> list[CellResult]:
    """Phases 3+4 (the grid) and 5 (report). Returns the cells."""
    t0 = time.perf_counter()
    cells = run_grid(inp, progress)
    inp.timings["distill+evaluate"] = time.perf_counter() - t0
    log(INFO, "phase 3+4 distill+evaluate: %d cells in %.1fs", len(cells), inp.timings["distill+evaluate"])

    t0 = time.perf_counter()
    run_dir = inp.run_dir
    log(INFO, "phase 5 report: audit, tables and figures ...")
    write_run_files(inp, cells)
    # Tables and figures come from the stored cells only, so `python -m server.report` rebuilds them identically.
    rebuild_report(run_dir, all_grids=False)
    inp.timings["report"] = time.perf_counter() - t0
    write_timings(inp.timings, run_dir / "timings.json")
    log(INFO, "phase 5 report: written to %s in %.1fs", run_dir, inp.timings["report"])
    print_summary(cells, inp.rounds, upload_summary(inp.weight_uploads, inp.safe_uploads, inp.dsv_uploads),
                  inp.timings, run_dir)
    return cells


def load_reused(folder: str | Path, meta: DatasetMeta, scenario: Scenario) -> tuple[OrderedDict[str, torch.Tensor], torch.Tensor, torch.Tensor, dict]:
    """theta* and T' from an earlier run folder, checked against this scenario."""
    folder = Path(folder).expanduser()
    if (folder / "global_model.pt").is_file():  # sha256 against the folder's manifest; no manifest: refused
        verify_files(folder, PHASE12_FILES, required=True)
    model = load_model_artifact(folder / "global_model.pt", dataset=meta.name)
    arch = dataclasses.asdict(scenario.model)
    if {k: v for k, v in model.arch.items() if k in arch} != {k: v for k, v in arch.items() if k in model.arch}:
        raise ValueError(f"{folder / 'global_model.pt'} was trained with model {model.arch}, "
                         f"but the scenario asks for {arch}")
    try:  # the weights themselves must fit the scenario's architecture (a stale 'arch' entry is not enough)
        build_model_from_artifact(dataclasses.replace(model, arch=arch), meta)
    except ArtifactError as err:
        raise ArtifactError(f"{err}\nFix: set the model section to the architecture {folder / 'global_model.pt'} "
                            "was trained with, or point reuse_artifacts at a run of this architecture") from err
    safe = load_safe_artifact(folder / "safe_pool.pt", meta=meta)
    counts = torch.bincount(safe.y, minlength=meta.num_classes)
    if scenario.pool_pipc == PIPC_ALL and int(safe.extra.get("pipc", 0)) != PIPC_ALL:
        raise ValueError(f"{folder / 'safe_pool.pt'} holds {counts.tolist()} images per class, but distill.pipc "
                         "has 'all': collect an 'all' pool (every client image) first")
    if scenario.pool_pipc > 0 and int(counts.min()) < scenario.pool_pipc:
        raise ValueError(f"{folder / 'safe_pool.pt'} holds {counts.tolist()} images per class, fewer than "
                         f"max(distill.pipc) = {scenario.pool_pipc}; collect a larger pool")
    return OrderedDict(model.state_dict), safe.x, safe.y, safe.extra


def main(argv: Sequence[str] | None = None) -> int:
    """Distill + evaluate + report from cached artifacts, without Flower."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", help="scenario YAML")
    parser.add_argument("--reuse", help="run folder with global_model.pt + safe_pool.pt (default: reuse_artifacts)")
    parser.add_argument("--cells", help="compute only the cells matching this filter, e.g. 'ipc=10' or "
                        "'method=dm,dkkt_dm; pipc=50' (distill.cells); server.merge combines the folders")
    parser.add_argument("--shard", help="compute only shard k of N, e.g. 1/2 (distill.shard)")
    parser.add_argument("--output-dir", help="run folder (default: the scenario's output_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="scenario override, dotted key (repeatable): --set evaluation.split=validation")
    args = parser.parse_args(argv)
    setup_process("server")  # an entry point: the same thread policy as the ServerApp (common/threads.py)
    overrides: dict = {}
    try:
        for item in args.set:
            if "=" not in item:
                raise ScenarioError(f"--set {item!r}: expected KEY=VALUE, e.g. --set distill.iterations=300")
            overrides.update(overrides_from_run_config({"overrides": item}))
        overrides.update({k: v for k, v in (("reuse_artifacts", args.reuse), ("distill.cells", args.cells),
                                            ("distill.shard", args.shard), ("output_dir", args.output_dir)) if v})
        scenario = load_scenario(args.scenario, overrides=overrides or None)
    except ScenarioError as err:  # a bad value (--set, --cells, --shard or the file's): one line, exit 2
        print(f"server.pipeline: {err}", file=sys.stderr)
        return 2
    if not scenario.reuse_artifacts:
        parser.error("no artifacts to reuse: pass --reuse or set reuse_artifacts in the scenario")
    check_data_root(scenario)  # data.root set but not a folder: stop before loading
    device = pick_device(scenario.device)
    scenario, profile = apply_device_profile(scenario, device.type)  # stated in the resolved scenario and records
    try:  # locked for this run; an unrelated folder or one with other settings is refused with the fix
        folder = RunFolder(scenario.run_dir).open_for_run(scenario)
    except RunFolderError as err:
        print(f"server.pipeline: {one_line(err)}", file=sys.stderr)
        return 2
    log(INFO, "device %s: profile %s", device, profile or "(every profile setting given explicitly)")
    try:
        data = federation_train_set(scenario)
        state, pool_x, pool_y, _ = load_reused(scenario.reuse_artifacts, data.meta, scenario)
        score_x, score_y = data.scoring_split(scenario.evaluation.split)  # test, or validation while tuning
        save_resolved(scenario, folder.root)
        run_pipeline(PipelineInputs(scenario=scenario, meta=data.meta, model_state=state, pool_x=pool_x,
                                    pool_y=pool_y, test_x=score_x, test_y=score_y, run_dir=folder.root,
                                    device=device))
    finally:
        folder.release()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
