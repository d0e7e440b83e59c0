"""Server-side handling of a numerical fault in one distillation cell.

``common.distill.synthesize`` raises ``DistillationError`` the moment a loss term, a
gradient or S turns NaN/Inf, after saving the last good S to the cell's checkpoint. The
sweep (server/sweep/cells.py) catches it per cell and records the cell as failed with the
message: :func:`failure_fields` gives the record's ``skipped`` / ``failed`` fields, which the
sweep writes as ``cells/<cell>.json`` (``"skipped": "failed: ..."``, so a restarted sweep retries
it and the report shows the reason), and the sweep goes on with the next cell.
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

from flwr.common.logger import log

__all__ = ["failure_fields"]


def failure_fields(spec: Any, err: Exception) -> dict[str, Any]:
    """The ``skipped`` and ``failed`` fields of a failed cell's record (the error, where it struck, the checkpoint)."""
    checkpoint = getattr(err, "checkpoint", None)
    reason = f"failed: {err}"
    log(WARNING, "cell %s %s; going on with the next cell", spec.name, reason)
    return {"skipped": reason,
            "failed": {"error": type(err).__name__, "message": str(err),
                       "iteration": getattr(err, "iteration", None), "terms": getattr(err, "terms", None),
                       "checkpoint": str(checkpoint) if checkpoint else None}}
