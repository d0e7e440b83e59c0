"""The phase 5 files made from the federation records and the artifacts, not from the cells alone
(``write_run_files``, the run's code), and their rebuild from a finished run folder
(``rebuild_run_files``, ``rebuild_all``: ``python -m server.report RUN_DIR``)."""

from __future__ import annotations

from collections.abc import Sequence
from logging import INFO
from pathlib import Path

import torch
from flwr.common.logger import log  # logging only (plain python logger); no Flower objects

from common.datasets import federation_train_set, normalize
from common.grid import pipc_label
from server.federation.validate import FailureLog
from server.reports.figures import load_run_scenario, rebuild_report
from server.reports.images import save_image_grid
from server.reports.privacy_report import write_privacy_reports
from server.reports.tables import write_rounds, write_uploads
from server.store.artifacts import load_model_artifact, load_safe_artifact
from server.store.manifest import load_history
from server.sweep.cells import read_cells
from server.sweep.inputs import PipelineInputs
from server.sweep.result import CellResult

__all__ = ["write_run_files", "rebuild_run_files", "rebuild_all"]


def write_run_files(inp: PipelineInputs, cells: Sequence[CellResult]) -> None:
    """The files phase 5 writes from the federation records and the artifacts (not from the cells alone):
    rounds.csv, uploads.csv/.json, images/safe_pool.png, communication.*, privacy.md, privacy_audit.csv,
    privacy/*.png. ``rebuild_run_files`` calls it with inputs read back from the run folder."""
    run_dir = inp.run_dir
    if inp.rounds:
        write_rounds(inp.rounds, run_dir / "rounds.csv")
    if inp.weight_uploads or inp.safe_uploads or inp.dsv_uploads:
        write_uploads(inp.weight_uploads, inp.safe_uploads, run_dir, inp.dsv_uploads)
    if len(inp.pool_y):
        save_image_grid(normalize(inp.pool_x, inp.meta), inp.pool_y, run_dir / "images" / "safe_pool.png", inp.meta,
                        title=f"safe pool T' ({pipc_label(inp.scenario.pool_pipc)} per class)")
    write_privacy_reports(inp, cells)  # audit, communication.md, privacy.md


def rebuild_run_files(run_dir: str | Path, audit: bool = True) -> dict[str, Path]:
    """Rewrite the files phase 5 derives from the federation records and artifacts, not only from the cells.

    From ``global_model.pt`` / ``safe_pool.pt`` (their stored rounds, uploads and client
    failures, server.store.manifest.load_history), the cells and the dataset's test split:
    ``rounds.csv``, ``uploads.csv``/``.json``, ``failures.csv``, ``images/safe_pool.png``,
    ``communication.csv``/``.md``, ``privacy.md`` and, with ``audit``, ``privacy_audit.csv`` +
    ``privacy/closest_*.png`` (the audit is recomputed: it reloads the training images). The
    same code as the run (``write_run_files``), so the files come out identical.
    """
    run_dir = Path(run_dir).resolve()
    scenario = load_run_scenario(run_dir)
    if not audit:
        scenario.privacy.audit = False
    data = federation_train_set(scenario)  # the test split (and the audit's private bank) as the run saw it
    meta = data.meta
    score_x, score_y = data.scoring_split(scenario.evaluation.split)  # what the cells were scored on
    model_file, pool_file = run_dir / "global_model.pt", run_dir / "safe_pool.pt"
    state = None
    if model_file.is_file():
        state = load_model_artifact(model_file, dataset=meta.name).state_dict
    if pool_file.is_file():
        pool = load_safe_artifact(pool_file, meta=meta)
        pool_x, pool_y = pool.x, pool.y
    else:
        pool_x = torch.zeros(0, *meta.image_shape, dtype=torch.uint8)
        pool_y = torch.zeros(0, dtype=torch.int64)
    history = load_history(run_dir, meta.name) if model_file.is_file() and pool_file.is_file() else {}
    failures = history.pop("failures", [])
    inp = PipelineInputs(scenario=scenario, meta=meta, model_state=state, pool_x=pool_x, pool_y=pool_y,
                         test_x=score_x, test_y=score_y, run_dir=run_dir, device=torch.device("cpu"),
                         **history)
    del data
    log(INFO, "report: rebuilding the run files of %s (audit %s)", run_dir, "on" if scenario.privacy.audit else "off")
    write_run_files(inp, read_cells(run_dir, scenario))
    written = {"rounds": run_dir / "rounds.csv", "communication": run_dir / "communication.md",
               "privacy": run_dir / "privacy.md"}
    if failures or (run_dir / "failures.csv").is_file() or history:
        written["failures"] = FailureLog(rows=failures).write(run_dir)
    if len(pool_y):
        written["safe_pool_grid"] = run_dir / "images" / "safe_pool.png"
    if scenario.privacy.audit:
        written["privacy_audit"] = run_dir / "privacy_audit.csv"
    return {k: v for k, v in written.items() if v is not None and v.exists()}


def rebuild_all(run_dir: str | Path, audit: bool = True) -> dict[str, Path]:
    """Every file a run writes, except the artifacts, cells and timings.json: run files, then tables + figures."""
    written = rebuild_run_files(run_dir, audit=audit)
    written.update(rebuild_report(run_dir))
    return written
