"""Sweep bookkeeping: the grid's cells, one atomic record per finished cell, resume.

A scenario's grid is ``distill.pipc x distill.ipc x distill.seeds x distill.methods``. The
federated phases run once; every cell reuses theta* and the safe pool T'. A cell with pipc p
distills from p images per class of T': with ``distill.safe_draw: random`` a draw seeded by the
cell's seed (synthesize; nested across pipc for one seed), with ``first`` the first p in pool
order (``server.federation.collect.pool_subset``).

Each finished cell is written to ``<run>/cells/<method>_ipc<k>_pipc<p>_seed<s>``: first the
synthetic set (``.pt``), then the record (``.json``, written via a temp file + rename, so a
record exists only for a complete cell). The record stores the cell's resolved distillation
and evaluation config plus a digest of its inputs (theta*, the pool subset, the test split).
With ``distill.resume`` (default) a rerun of the same scenario reads finished cells back
instead of recomputing them; a record whose config or inputs differ is recomputed, and the log
says which keys differ. Cells that cannot run (``common.grid.static_skip_reason``, or a pipc
'all' pool with fewer than ipc images of a class for real-image methods) are recorded as skipped.

The federated phases resume too: ``federation.json`` stamps the settings that produced the
folder's ``global_model.pt`` + ``safe_pool.pt``; a rerun with the same stamp loads them
(:func:`resumable_federation`) instead of training again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import numpy as np
import torch
from flwr.common.logger import log  # plain python logger; no Flower objects here
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.datasets import normalize
from common.grid import PIPC_ALL, pipc_label, real_init_methods, select_cells, static_skip_reason
from common.scenario import Scenario
from server.sweep.loss_trace import write_cell_trace
from server.store.artifacts import load_synthetic_artifact, save_synthetic_artifact
from server.federation.collect import pool_subset
from common.distill.synthesize import DistillConfig, SyntheticSet
from common.methods import uses_dsvs
from server.sweep.faults import failure_fields
from server.store.manifest import MANIFEST, ManifestError, federation_stamp, read_manifest, verify_files
from server.store.run_folder import RunFolder, RunFolderError, default_settings, settings_diff
from common.evaluate import EvalConfig
from server.sweep.cell_pool import (CellOutcome, CellTask, PoolInputs, SharedInputs, cell_cost, chain_tasks,
                                    resolve_workers, run_chains)
from server.sweep.inputs import PipelineInputs
from server.sweep.ray_pool import run_ray_chains  # Ray itself loads only for a Ray sweep
from server.sweep.result import CellResult

__all__ = [
    "CELLS_DIR", "CellSpec", "CellRecordError", "SweepProgress", "seeds_of", "cell_specs", "tensor_digest", "run_cells",
    "read_cells",
    "write_federation_stamp", "resumable_federation", "pool_quota",
]

CELLS_DIR = "cells"
FORMAT = 1
# DistillConfig knobs that do not change a cell's result (excluded from the resume guard): a resumed cell keeps
# the stationarity diagnostic it was computed with.
_NOT_RESULT_KEYS = ("checkpoint_every", "diagnose_samples", "diagnose_path_points")


@dataclass(frozen=True)
class CellSpec:
    method: str
    ipc: int
    pipc: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_ipc{self.ipc}_pipc{pipc_label(self.pipc)}_seed{self.seed}"


def seeds_of(s: Scenario) -> list[int]:
    """The sweep's seeds: ``distill.seeds``, default ``[seed]``."""
    return list(s.distill.seeds) if s.distill.seeds else [s.seed]


def cell_specs(s: Scenario) -> list[CellSpec]:
    """Every cell in run order: pipc, ipc, seed, then methods in scenario order (dsv before blend)."""
    return [CellSpec(m, ipc, pipc, seed) for pipc in s.distill.pipc for ipc in s.distill.ipc
            for seed in seeds_of(s) for m in s.distill.methods]


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    """sha256 over shapes, dtypes and bytes: identifies theta*, a pool or a test split."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class CellRecordError(ValueError):
    """A cell record under cells/ is unreadable, malformed, or not the one the manifest lists."""


class _CellKey(BaseModel):
    model_config = ConfigDict(extra="allow")
    method: str
    ipc: int
    pipc: int
    seed: int


class _CellResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    accuracies: list[Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]] = []
    mean: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    std: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    distill_s: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0
    eval_s: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0


class _CellRecord(BaseModel):
    """The schema of cells/<cell>.json (written by :func:`run_cells` / server.sweep.faults)."""

    model_config = ConfigDict(extra="allow")
    format: int = FORMAT
    cell: _CellKey
    config: dict[str, Any] | None = None
    files: dict[str, str] = {}
    result: _CellResult | None = None
    skipped: str = ""


def _confined(run_dir: Path, rel: str, where: str) -> str:
    """``run_dir / rel`` when it stays inside the run folder (no absolute path, no ``..``, no link out)."""
    root = run_dir.resolve()
    target = (root / rel).resolve()
    if Path(rel).is_absolute() or not target.is_relative_to(root):
        raise CellRecordError(f"{where}: path {rel!r} leaves the run folder {root}; a record may only name files "
                              "inside it. Delete the record to recompute the cell")
    return str(root / rel)


def _record_to_cell(rec: Any, run_dir: Path, where: str = "cell record") -> CellResult:
    try:
        r = _CellRecord.model_validate(rec)
    except ValidationError as err:
        raise CellRecordError(f"{where} is malformed: {err}. Delete it to recompute the cell") from err
    res = r.result
    if not r.skipped:
        if res is None or not res.accuracies or res.mean is None or res.std is None:
            raise CellRecordError(f"{where} has neither a result nor a skip reason. Delete it to recompute the cell")
        # the summary must follow from the accuracies it summarizes (an edited mean is caught here)
        if abs(float(np.mean(res.accuracies)) - res.mean) > 1e-6 or abs(float(np.std(res.accuracies)) - res.std) > 1e-6:
            raise CellRecordError(f"{where}: mean/std {res.mean}/{res.std} do not follow from its accuracies "
                                  f"{res.accuracies}. Delete it to recompute the cell")
    files = {k: _confined(run_dir, v, where) for k, v in r.files.items()}
    c = r.cell
    return CellResult(method=c.method, ipc=c.ipc, pipc=c.pipc, seed=c.seed,
                      accuracies=list(res.accuracies) if res else [],
                      mean=res.mean if res and res.mean is not None else float("nan"),
                      std=res.std if res and res.std is not None else float("nan"),
                      distill_s=res.distill_s if res else 0.0, eval_s=res.eval_s if res else 0.0, files=files,
                      skipped=r.skipped)


def _read_record(path: Path) -> dict:
    """JSON of one cell record; any failure names the file."""
    try:
        rec = json.loads(RunFolder(path.parent).read_text(path.name))  # a regular file, no link, size-limited
    except (OSError, RunFolderError, json.JSONDecodeError) as err:
        raise CellRecordError(f"{path} cannot be read as a cell record ({type(err).__name__}: {err}); "
                              "delete it to recompute the cell") from err
    if not isinstance(rec, dict):
        raise CellRecordError(f"{path} must hold a JSON object, got {type(rec).__name__}; delete it to recompute")
    return rec


def _new_record(spec: CellSpec, config: dict, **fields: Any) -> dict:
    """A cell record: the cell, its config and ``fields`` (ok: files/result/info; skipped or failed: skipped...)."""
    return _plain({"format": FORMAT, "cell": {**dataclasses.asdict(spec), "pipc_label": pipc_label(spec.pipc)},
                   "config": config, **fields})


def _write_record(run_dir: Path, spec: CellSpec, rec: dict, with_set: bool) -> Path:
    """The one writer of ``cells/<cell>.json``: atomic, confined, and hashed into manifest.json together with
    the cell's synthetic set (``with_set``), so a reported number is a checked one."""
    folder = RunFolder(run_dir)
    path = folder.write_json(f"{CELLS_DIR}/{spec.name}.json", rec)
    folder.record([f"{CELLS_DIR}/{spec.name}.json"] + ([f"{CELLS_DIR}/{spec.name}.pt"] if with_set else []))
    return path


def _cell_listed(run_dir: Path, spec: CellSpec) -> str | None:
    """None when the cell's files match the manifest, else why not (resume then recomputes the cell)."""
    names = [f"{CELLS_DIR}/{spec.name}.json", f"{CELLS_DIR}/{spec.name}.pt"]
    try:
        verify_files(run_dir, names, required=True)
    except ManifestError as err:
        return str(err)
    listed = (read_manifest(run_dir) or {}).get("files", {})
    missing = [n for n in names if n not in listed]
    return f"{', '.join(missing)} not in {run_dir / MANIFEST}" if missing else None


def _resumable(run_dir: Path, spec: CellSpec, config: dict) -> CellResult | None:
    """The finished cell read back, or None (recompute) when it is absent, unlisted, changed or stale."""
    json_path, pt_path = run_dir / CELLS_DIR / f"{spec.name}.json", run_dir / CELLS_DIR / f"{spec.name}.pt"
    if not (json_path.is_file() and pt_path.is_file()):
        return None
    why = _cell_listed(run_dir, spec)
    rec: dict = {}
    if why is None:
        try:
            rec = _read_record(json_path)
            cell = _record_to_cell(rec, run_dir, str(json_path))
        except CellRecordError as err:
            why = str(err)
    if why is not None:
        log(WARNING, "cell %s: %s; recomputing", spec.name, why)
        return None
    if rec.get("config") == config and not rec.get("skipped"):
        return cell
    log(WARNING, "cell %s: stored record differs in %s; recomputing", spec.name,
        ", ".join(settings_diff(rec.get("config"), config)[:8]) or "status")
    return None


def read_cells(run_dir: str | Path, scenario: Scenario) -> list[CellResult]:
    """The recorded cells of ``scenario``'s grid in run order (cells with no record are left out).

    Every record must be listed in the run folder's manifest with its sha256 (and so must the
    synthetic set it names): a record edited, truncated or copied in after the run is refused
    with the file's name, as is a folder with records but no manifest.
    """
    run_dir = Path(run_dir)
    cells = []
    for spec in cell_specs(scenario):
        path = run_dir / CELLS_DIR / f"{spec.name}.json"
        if path.is_file():
            rel = f"{CELLS_DIR}/{spec.name}.json"
            verify_files(run_dir, [rel], required=True)
            if rel not in (read_manifest(run_dir) or {}).get("files", {}):
                raise ManifestError(f"{path} is not listed in {run_dir / MANIFEST}: it was not written by this run; "
                                    "delete it (and rerun the cell) or rerun the sweep")
            cell = _record_to_cell(_read_record(path), run_dir, str(path))
            syn = cell.files.get("synthetic")
            if syn and Path(syn).is_file():
                verify_files(run_dir, [str(Path(syn).relative_to(run_dir.resolve()))], required=True)
            cells.append(cell)
    return cells


def _skipped(spec: CellSpec, reason: str, run_dir: Path, config: dict) -> CellResult:
    log(INFO, "cell %s skipped: %s", spec.name, reason)
    _write_record(run_dir, spec, _new_record(spec, config, skipped=reason), with_set=False)
    return CellResult(method=spec.method, ipc=spec.ipc, pipc=spec.pipc, seed=spec.seed, accuracies=[],
                      mean=float("nan"), std=float("nan"), skipped=reason)


class SweepProgress:
    """The sweep-level line after each computed cell: 'sweep: 12/60 cells done (dm_ipc1_pipc10_seed0), 9 min
    elapsed, ETA 1 h 10 min', the ETA from the elapsed time per unit of the cells' relative cost (cell_cost)."""

    def __init__(self, methods_to_compute: Sequence[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.count = len(methods_to_compute), 0
        self.cost_left = float(sum(cell_cost(m) for m in methods_to_compute))
        self.cost_done, self.clock, self.t0 = 0.0, clock, clock()

    def done(self, method: str, name: str) -> str:
        self.count += 1
        cost = cell_cost(method)
        self.cost_done, self.cost_left = self.cost_done + cost, max(self.cost_left - cost, 0.0)
        elapsed = self.clock() - self.t0
        eta = elapsed / self.cost_done * self.cost_left if self.cost_done else float("nan")
        return (f"sweep: {self.count}/{self.total} cells done ({name}), {_duration(elapsed)} elapsed, "
                f"ETA {_duration(eta) if self.cost_left else 'done'}")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    minutes = int(round(seconds / 60))
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else (f"{minutes} min" if minutes else
                                                                        f"{int(seconds)} s")


def run_cells(inp: PipelineInputs, model: torch.nn.Module | None, embed_factory: Callable[[torch.Generator], torch.nn.Module],
              dcfg: DistillConfig, ecfg: EvalConfig, model_factory: Callable[[int], torch.nn.Module], progress: bool,
              init_model: torch.nn.Module | None = None) -> list[CellResult]:
    """Distill + evaluate every cell of ``inp.scenario``, resuming.

    This process plans (skip, resume) and writes every record; the cells to compute run in
    ``distill.workers`` processes (server/sweep/cell_pool.py). The factories must be picklable when
    more than one worker runs (``functools.partial(build_model, meta, arch)``, ``make_embed_factory``).
    """
    s, meta, dev, run_dir = inp.scenario, inp.meta, inp.device, Path(inp.run_dir)
    cells_dir = run_dir / CELLS_DIR
    cells_dir.mkdir(parents=True, exist_ok=True)
    state = list(inp.model_state.values()) if inp.model_state is not None else []
    client_dsvs = inp.client_dsvs  # privacy.mode no_model_access (server.federation.modes): no theta*
    if client_dsvs is not None:
        state = list(client_dsvs.x)
    base_digest = {"model": tensor_digest(*state), "test": tensor_digest(inp.test_x, inp.test_y)}
    distill_dict = {k: v for k, v in dcfg.engine_dict().items() if k not in _NOT_RESULT_KEYS}
    order = {spec: i for i, spec in enumerate(cell_specs(s))}
    selected = set(select_cells(list(order), s.distill.methods, s.distill.cells, s.distill.shard))
    if len(selected) < len(order):  # a shard of the grid (server.merge combines the shards' folders)
        log(INFO, "sweep: %d of the grid's %d cells (distill.cells %r, distill.shard %r)", len(selected), len(order),
            s.distill.cells, s.distill.shard)
    done: dict[CellSpec, CellResult] = {}  # finished (read back, skipped, failed or computed), by spec
    configs: dict[CellSpec, dict] = {}
    tasks: list[CellTask] = []
    dsv_by_group: dict[tuple, SyntheticSet | None] = {}  # a resumed dsv cell's set, for blend / dm_from_dsv
    pools: dict[int, PoolInputs] = {}
    reused = 0
    for pipc in s.distill.pipc:
        safe_x = safe_y = None
        min_count = 0
        pool_digest = tensor_digest(None)
        if pipc != 0:
            sub_x, safe_y = pool_subset(inp.pool_x, inp.pool_y, pipc, meta.num_classes)  # refuses a short pool
            counts = torch.bincount(safe_y, minlength=meta.num_classes)
            min_count = int(counts.min()) if len(counts) else 0
            if dcfg.safe_draw == "random":  # each seed draws its pipc per class from the whole pool (synthesize)
                sub_x, safe_y = inp.pool_x, inp.pool_y
            safe_x = sub_x  # uint8, 4x smaller in every worker; synthesize normalizes each drawn batch
            pool_digest = tensor_digest(sub_x, safe_y)
        # synthesize wants the real pool size; 'all' keeps appendix A's alpha for 'all' (alpha_for(PIPC_ALL)).
        eff_pipc = min_count if pipc == PIPC_ALL else pipc
        cell_dcfg = dcfg if (pipc != PIPC_ALL or dcfg.alpha is not None) else \
            dataclasses.replace(dcfg, alpha=dcfg.alpha_for(PIPC_ALL))
        pools[pipc] = PoolInputs(safe_x=safe_x, safe_y=safe_y, eff_pipc=eff_pipc, dcfg=cell_dcfg,
                                 safe_normalize=functools.partial(normalize, meta=meta))
        for ipc in s.distill.ipc:
            client_dsv = None  # no_model_access: the clients' uploaded DSVs, combined to ipc per class
            if client_dsvs is not None:
                client_dsv = (*client_dsvs.combined(ipc, meta.num_classes), client_dsvs.combine)
            for seed in seeds_of(s):
                group_dsv: SyntheticSet | None = None  # a resumed dsv of this (pipc, ipc, seed)
                group_computes_dsv = False
                for method in s.distill.methods:
                    spec = CellSpec(method, ipc, pipc, seed)
                    if spec not in selected:
                        continue
                    json_path, pt_path = cells_dir / f"{spec.name}.json", cells_dir / f"{spec.name}.pt"
                    config = {"distill": {**distill_dict, **s.distill.method_settings.get(method, {}),
                                          "alpha": cell_dcfg.alpha},
                              "evaluation": dataclasses.asdict(ecfg),  # incl. width/depth of the evaluation net
                              "model": dataclasses.asdict(s.model),
                              "dataset": meta.name, "inputs": {**base_digest, "pool": pool_digest}}
                    if uses_dsvs(method):
                        config["inputs"]["dsv"] = None if group_computes_dsv or group_dsv is None \
                            else tensor_digest(group_dsv.x)
                    config = _plain(config)
                    configs[spec] = config
                    reason = static_skip_reason(method, ipc, pipc, s.distill.init)
                    if reason is None and pipc == PIPC_ALL and method in real_init_methods(s.distill.init) \
                            and ipc > min_count:
                        reason = f"method '{method}' takes {ipc} real images per class; the 'all' pool has {min_count}"
                    if reason:
                        done[spec] = _skipped(spec, reason, run_dir, config)
                        continue
                    # a blend whose dsv is recomputed in this run is recomputed too (its input changes)
                    cell = None if (uses_dsvs(method) and group_computes_dsv) else (
                        _resumable(run_dir, spec, config) if s.distill.resume else None)
                    if cell is not None:
                        done[spec] = cell
                        if method == "dsv":
                            art = load_synthetic_artifact(pt_path, dataset=meta.name, cell=(method, pipc))
                            group_dsv = SyntheticSet(x=art.x, y=art.y, method="dsv", ipc=art.ipc, info=art.info)
                        reused += 1
                        log(INFO, "cell %s: finished earlier, read back from %s", spec.name, json_path)
                        continue
                    if method == "dsv":
                        group_computes_dsv = True
                    # always a path: with checkpoint_every 0 it is only written on a NaN (last good S)
                    tasks.append(CellTask(spec, cells_dir / f"{spec.name}.ckpt.pt", client_dsv))
                dsv_by_group[(pipc, ipc, seed)] = group_dsv

    computed_dsv: dict[tuple, str] = {}  # digest of the dsv set a group computed in this run
    progress_line = SweepProgress([t.spec.method for t in tasks])

    def record(out: CellOutcome) -> None:
        _record(out)
        log(INFO, "%s", progress_line.done(out.spec.method, out.spec.name))

    def _record(out: CellOutcome) -> None:
        spec, config = out.spec, configs[out.spec]
        group = (spec.pipc, spec.ipc, spec.seed)
        if uses_dsvs(spec.method) and group in computed_dsv:  # the input it took, known once the dsv ran
            config = configs[spec] = _plain({**config, "inputs": {**config["inputs"], "dsv": computed_dsv[group]}})
        if out.error is not None:  # NaN/Inf in this cell: record it, go on (server/sweep/faults.py)
            rec = _new_record(spec, config, **failure_fields(spec, out.error))
            _write_record(run_dir, spec, rec, with_set=False)
            done[spec] = CellResult(method=spec.method, ipc=spec.ipc, pipc=spec.pipc, seed=spec.seed, accuracies=[],
                                    mean=float("nan"), std=float("nan"), skipped=rec["skipped"])
            return
        syn, res = out.syn, out.result
        if spec.method == "dsv":
            computed_dsv[group] = tensor_digest(syn.x)
        json_path, pt_path = cells_dir / f"{spec.name}.json", cells_dir / f"{spec.name}.pt"
        save_synthetic_artifact(pt_path, syn, meta.name, spec.pipc)  # before the record: record => set exists
        rec = _new_record(spec, config, files={"synthetic": f"{CELLS_DIR}/{pt_path.name}",
                                               "grid": f"images/{spec.name}.png"},
                          result={"accuracies": list(res.accuracies), "mean": res.mean, "std": res.std,
                                  "distill_s": out.distill_s, "eval_s": out.eval_s},
                          info=syn.info)
        _write_record(run_dir, spec, rec, with_set=True)
        done[spec] = _record_to_cell(rec, run_dir, str(json_path))
        history = syn.info.get("loss_history") or []
        if history:  # every distilled method's trace, as the report draws them
            write_cell_trace(history, run_dir / "traces", spec.name, spec.method, spec.ipc, pipc_label(spec.pipc),
                             spec.seed, stationarity=rec["info"].get("stationarity"))
        log(INFO, "cell %s: %.2f ± %.2f %% (distill %.1fs, evaluate %.1fs)", spec.name,
            100 * res.mean, 100 * res.std, out.distill_s, out.eval_s)

    chains = chain_tasks(tasks, dsv_by_group)
    shared = SharedInputs(model=model, embed_factory=embed_factory, model_factory=model_factory, ecfg=ecfg,
                          test_x=normalize(inp.test_x, meta), test_y=inp.test_y, num_classes=meta.num_classes,
                          image_shape=tuple(meta.image_shape), device=dev, pools=pools, init_model=init_model,
                          progress=progress)
    if s.distill.executor == "ray" and chains:
        log(INFO, "sweep: %d cells to compute on Ray", len(tasks))
        run_ray_chains(shared, chains, s.distill.workers, record, address=s.distill.ray_address,
                       max_retries=s.distill.ray_max_retries, gpus=s.distill.ray_gpus)
    else:
        workers = resolve_workers(s.distill.workers, dev, len(chains))
        if tasks:
            log(INFO, "sweep: %d cells to compute in %d process%s", len(tasks), workers, "es" if workers > 1 else "")
        run_chains(shared, chains, workers, record)
    cells = [done[spec] for spec in sorted(done, key=order.__getitem__)]
    failed = sum(1 for t in tasks if done[t.spec].skipped)
    log(INFO, "sweep: %d cells computed, %d read back, %d skipped", len(tasks) - failed, reused,
        sum(1 for c in cells if c.skipped))
    return cells


# ---------------------------------------------------------------- federated phases: pool quota and resume


def pool_quota(scenario: Scenario, train_y: torch.Tensor, num_classes: int) -> tuple[int, bool]:
    """(per-class quota, allow_short) for the safe-pool collection.

    pipc 'all': the clients upload everything, so the quota is the largest class count of the
    federation's training view and smaller classes are taken whole.
    """
    if scenario.pool_pipc != PIPC_ALL:
        return scenario.pool_pipc, False
    counts = torch.bincount(train_y.long(), minlength=num_classes)
    return int(counts.max()), True


_STAMP = "federation.json"


def write_federation_stamp(s: Scenario) -> Path:
    return RunFolder(s.run_dir).write_json(_STAMP, federation_stamp(s))


def resumable_federation(s: Scenario) -> bool:
    """True when this run folder already holds theta* and T' made by the same federation settings."""
    d = s.run_dir
    if not s.distill.resume or s.reuse_artifacts:
        return False
    if not all((d / f).is_file() for f in (_STAMP, "global_model.pt", "safe_pool.pt")):
        return False
    try:
        stored = json.loads(RunFolder(d).read_text(_STAMP))
    except (OSError, RunFolderError, json.JSONDecodeError) as err:
        log(WARNING, "resume: %s is unreadable (%s); running the federated phases again", d / _STAMP, err)
        return False
    keys = settings_diff(stored, federation_stamp(s), default_settings()[1])  # a key added since: its default
    if keys:
        log(WARNING, "resume: %s differs in %s; running the federated phases again", d / _STAMP, ", ".join(keys[:8]))
        return False
    return True
