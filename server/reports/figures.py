"""Rebuild a run folder's tables and figures from its stored cells (``python -m server.report RUN_DIR``).

Reads only: ``scenario.resolved.yaml`` (the grid and the dataset), ``cells/*.json`` + ``.pt``
(server.sweep.cells), ``rounds.csv`` and ``safe_pool.pt`` when present. Writes:

- ``results.md`` / ``results.csv`` / ``results_long.csv`` (server.reports.tables; Table 1 layout);
- ``images/<cell>.png``: each synthetic set as a grid with class names (server.reports.images);
- ``frequency.csv`` + ``figures/spectra_ipc<k>_pipc<p>.png``: paper Fig. 3, the mean log-magnitude
  FFT spectra of the dsv / dsv_real / dm / dkkt_dm / blend sets of one (ipc, pipc), first seed,
  next to the real safe images, and the low/high-frequency energy split of every set
  (server.reports.frequency; per-image mean removed, cutoff 0.25 x Nyquist, so brightness is ignored);
- ``figures/accuracy_vs_pipc.png``: accuracy against pipc per method, one panel per ipc;
- ``rounds.png``: the federated learning curve from ``rounds.csv``;
- ``traces/<cell>.csv`` + ``.png``: the loss-term traces of each DKKT cell (server.sweep.loss_trace).

``server.reports.run_files.rebuild_all`` (``python -m server.report``) also rewrites what phase 5
derives from the artifacts and records.

results.md is a pure function of the cell records, so a rebuild reproduces it byte for byte.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from common.datasets import get_meta, normalize
from common.grid import pipc_label
from common.scenario import Scenario, scenario_from_dict
from server.store.artifacts import load_safe_artifact, load_synthetic_artifact
from server.federation.collect import pool_subset
from server.reports.frequency import frequency_table, mean_log_spectrum
from server.reports.images import save_image_grid
from server.reports.paper_figures import write_paper_figures
from server.reports.plots import plot_spectra
from server.reports.tables import write_results
from server.sweep.cells import read_cells
from server.federation.validate import FailureLog
from server.reports.privacy_report import results_note
from server.sweep.loss_trace import write_cell_trace
from server.store.run_folder import RunFolder, RunFolderError, write_dict_csv, write_text

__all__ = ["SPECTRUM_METHODS", "FREQ_CUTOFF", "load_run_scenario", "rebuild_report"]

SPECTRUM_METHODS = ("dsv", "dsv_real", "dm", "dkkt_dm", "blend")
FREQ_CUTOFF = 0.25  # units of Nyquist


def load_run_scenario(run_dir: str | Path) -> Scenario:
    """The scenario a run folder was made with (its scenario.resolved.yaml)."""
    path = Path(run_dir) / "scenario.resolved.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a fedpdd run folder?")
    values = RunFolder(run_dir).read_yaml("scenario.resolved.yaml") or {}  # no aliases, size-limited, no link
    if not isinstance(values, dict):
        raise RunFolderError(f"{path}: the top level must be a mapping of keys, got {type(values).__name__}")
    values.pop("output_dir", None)  # the folder may have moved; it is given explicitly
    if isinstance(values.get("data"), dict):
        values["data"]["download"] = False  # a report reads local data only; a run folder cannot ask for a download
    return scenario_from_dict(values, source=str(path))


def _append_failures(results_md: Path, run_dir: Path) -> None:
    """The 'Client failures' section, as server.federation.validate.FailureLog.write appends it after a run."""
    path = run_dir / "failures.csv"
    if not path.is_file():
        return
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows:
        marker = "\n## Client failures\n"
        text = results_md.read_text().split(marker)[0].rstrip("\n") + "\n" + marker + "\n" + FailureLog(rows=rows).markdown()
        write_text(results_md, text)


def results_title(scenario: Scenario) -> str:
    return f"{scenario.name}: synthetic-set {scenario.evaluation.split} accuracy ({get_meta(scenario.data.dataset).name})"


def interval_scope(scenario: Scenario) -> str:
    """What the spread over seeds in results.md covers, and what it does not."""
    d = scenario.distill
    draw = ("each seed draws its own pipc safe images per class from the pool (distill.safe_draw: random), its "
            "own random networks, DSA draws and evaluation networks" if d.safe_draw == "random" else
            "every seed uses the same first pipc safe images per class (distill.safe_draw: first); seeds vary the "
            "random networks, DSA draws and evaluation networks only")
    split = ("the test split" if scenario.evaluation.split == "test" else
             f"the validation split ({scenario.data.validation_size} held-out training images)")
    return (f"Scored on {split}. Seeds: {draw}. All seeds share one federation (theta*, partition and safe "
            f"pool of scenario seed {scenario.seed}): the intervals do not cover the federation's draw.")


def _rebuild_traces(run_dir: Path, cells: list, only_stale: bool = False) -> dict[str, Path]:
    """traces/<cell>.csv + .png from each distilled cell record's loss history (server.sweep.loss_trace's writer,
    as server.sweep.cells uses it). ``only_stale`` (the pipeline): skip a trace newer than its record."""
    written: dict[str, Path] = {}
    for c in cells:
        syn = c.files.get("synthetic")
        if not syn:
            continue
        name = Path(syn).stem
        record, png = run_dir / "cells" / f"{name}.json", run_dir / "traces" / f"{name}.png"
        if not record.is_file():
            continue
        if only_stale and png.is_file() and png.stat().st_mtime >= record.stat().st_mtime:
            written[f"trace_{name}"] = png
            continue
        info = json.loads(RunFolder(run_dir).read_text(f"cells/{name}.json")).get("info") or {}
        history = info.get("loss_history") or []
        if history:
            written[f"trace_{name}"] = write_cell_trace(history, run_dir / "traces", name, c.method, c.ipc,
                                                        pipc_label(c.pipc), c.seed,
                                                        stationarity=info.get("stationarity"))
    return written


def rebuild_report(run_dir: str | Path, all_grids: bool = True, figures: bool = True) -> dict[str, Path]:
    """Write every table and figure of ``run_dir`` from its records; returns kind -> path.

    ``all_grids=False`` (the pipeline) redraws only image grids missing or older than their set;
    ``figures=False`` writes the tables and frequency.csv only (no PNG).
    """
    run_dir = Path(run_dir).resolve()
    scenario = load_run_scenario(run_dir)
    meta = get_meta(scenario.data.dataset)
    cells = read_cells(run_dir, scenario)
    written: dict[str, Path] = {}
    if not cells:
        raise FileNotFoundError(f"{run_dir / 'cells'} holds no cell records of this scenario's grid: nothing to report")
    written.update({f"results_{k}": v for k, v in write_results(cells, run_dir, title=results_title(scenario),
                                                                  scope=interval_scope(scenario)).items()})
    note = results_note(scenario, run_dir)  # the privacy modes' note (server.reports.privacy_report)
    if note:
        write_text(written["results_md"], written["results_md"].read_text() + note)
    _append_failures(written["results_md"], run_dir)

    ran = [c for c in cells if not c.skipped]
    sets: dict[str, tuple] = {}  # cell name -> (x, y), loaded once
    for c in ran:
        syn_path = Path(c.files.get("synthetic", ""))
        if not syn_path.is_file():
            continue
        art = load_synthetic_artifact(syn_path, dataset=meta.name, cell=(c.method, c.pipc))
        sets[c.files["grid"]] = (art.x, art.y, c)
        grid = Path(c.files["grid"])
        if not figures or not all_grids and grid.is_file() and grid.stat().st_mtime >= syn_path.stat().st_mtime:
            continue
        save_image_grid(art.x, art.y, c.files["grid"], meta,
                        title=f"{c.method} ipc={c.ipc} pipc={pipc_label(c.pipc)} seed={c.seed}")
    if sets:
        written["image_grids"] = run_dir / "images"
    if figures:  # loss-term traces of the DKKT cells, as server.sweep.cells writes them after a cell
        written.update(_rebuild_traces(run_dir, ran, only_stale=not all_grids))

    # Fig. 3: spectra per (ipc, pipc) at the first seed, plus the real safe images as reference.
    first_seed = (scenario.distill.seeds or [scenario.seed])[0]
    pool = None
    if (run_dir / "safe_pool.pt").is_file():
        pool = load_safe_artifact(run_dir / "safe_pool.pt", meta=meta)
    rows: list[dict] = []
    for ipc in scenario.distill.ipc:
        for pipc in scenario.distill.pipc:
            group = {c.method: (x, y) for x, y, c in sets.values()
                     if c.ipc == ipc and c.pipc == pipc and c.seed == first_seed and c.method in SPECTRUM_METHODS}
            if not group:
                continue
            named = {}
            if pool is not None and pipc != 0 and len(pool.y):
                real_x, _ = pool_subset(pool.x, pool.y, pipc, meta.num_classes)
                named[f"real (pipc {pipc_label(pipc)})"] = normalize(real_x, meta)
            named.update({m: group[m][0] for m in SPECTRUM_METHODS if m in group})
            for r in frequency_table(named, cutoff=FREQ_CUTOFF, remove_mean=True):
                rows.append({"ipc": ipc, "pipc": pipc_label(pipc), "seed": first_seed, **r})
            out = run_dir / "figures" / f"spectra_ipc{ipc}_pipc{pipc_label(pipc)}.png"
            if not figures:
                continue
            plot_spectra({k: mean_log_spectrum(v) for k, v in named.items()}, out,
                         title=f"Mean log amplitude spectrum, ipc={ipc}, pipc={pipc_label(pipc)}")
            written[f"spectra_ipc{ipc}_pipc{pipc_label(pipc)}"] = out
    if rows:
        written["frequency"] = write_dict_csv(
            run_dir / "frequency.csv", ["ipc", "pipc", "seed", "set", "low_energy", "high_energy", "low_high_ratio",
                                        "cutoff"],
            ({**{k: (f"{v:.6f}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in r.items()},
              "cutoff": FREQ_CUTOFF} for r in rows))

    if not figures:
        return written
    written.update(write_paper_figures(run_dir, scenario, meta, cells, sets))
    return written
