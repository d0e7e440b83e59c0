"""Server-side handling of a numerical fault in one distillation cell.

``common.distill.synthesize`` raises ``DistillationError`` the moment a loss term, a
gradient or S turns NaN/Inf, after saving the last good S to the cell's checkpoint. The
sweep (server/sweep/cells.py) catches it per cell and calls :func:`record_failed_cell`: the cell
is recorded as failed with the message (``cells/<cell>.json``, ``"skipped": "failed: ..."``,
so a restarted sweep retries it and the report shows the reason), and the sweep goes on
with the next cell.
"""

from __future__ import annotations

import dataclasses
import json
import os
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from common.grid import pipc_label
from server.sweep.result import CellResult

__all__ = ["record_failed_cell"]


def record_failed_cell(spec: Any, err: Exception, run_dir: Path, config: dict, cells_dir: str = "cells",
                       fmt: int = 1) -> CellResult:
    """Write the failed cell's record (atomically) and return it as a CellResult with no accuracy."""
    checkpoint = getattr(err, "checkpoint", None)
    reason = f"failed: {err}"
    log(WARNING, "cell %s %s; going on with the next cell", spec.name, reason)
    rec = {"format": fmt, "cell": {**dataclasses.asdict(spec), "pipc_label": pipc_label(spec.pipc)}, "config": config, "skipped": reason,
           "failed": {"error": type(err).__name__, "message": str(err),
                      "iteration": getattr(err, "iteration", None), "terms": getattr(err, "terms", None),
                      "checkpoint": str(checkpoint) if checkpoint else None}}
    path = Path(run_dir) / cells_dir / f"{spec.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(rec, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)
    return CellResult(method=spec.method, ipc=spec.ipc, pipc=spec.pipc, seed=spec.seed, accuracies=[],
                      mean=float("nan"), std=float("nan"), skipped=reason)
