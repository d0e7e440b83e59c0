"""Phase 5 additions: privacy audit of every synthetic set, communication accounting, privacy.md.

Files (in the run folder):

* ``privacy_audit.csv``: one row per synthetic set (``server.reports.audit.AuditResult.row``) plus a
  sanity row ``safe_pool`` (the uploaded safe images against the private bank: real images that
  were never in that bank, so they should sit at the reference distance, unflagged);
  ``privacy/closest_<set>.png``: the 10 synthetic images closest to a private image, each above it.
* ``communication.csv`` / ``communication.md``: bytes uploaded per client and in total, by kind
  (model weights over all rounds, safe images, DSVs), against the bytes of the private shard.
* ``privacy.md``: privacy mode, DP settings (clipping norm, noise multiplier, noise stdev), what
  left the clients, the audit summary and its cost.

The audit's private bank = the federation's training images whose content key
(``common.records.image_keys``) is NOT among those of the safe pool this run used (no client sends
training-set indices); per-client DSVs (no_model_access) are audited one client at a time
(``dsv_client<p>``) as well as combined; reference = ``privacy.audit_reference``
held-out test images; embedding space = theta* when the server has it (mode ``model``), pixel
space only otherwise. The server reloads the training images for this: it is an experimenter's
audit of a simulation, not something a deployed server could do. Cost: one pass of ``embed`` over
the private bank plus chunked (4096 x 4096) distance blocks; timed in ``timings.json`` (``audit``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Sequence
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common.logger import log

from common.datasets import federation_train_set, normalize
from common.models import build_model
from common.records import image_keys
from server.reports.tables import upload_summary
from server.sweep.inputs import PipelineInputs
from server.sweep.result import CellResult
from server.reports.audit import AuditReference, save_closest_pairs_grid
from server.store.artifacts import load_synthetic_artifact
from server.federation.dp import dp_summary
from server.store.run_folder import write_dict_csv, write_text

__all__ = ["write_privacy_reports", "write_communication", "audit_sets", "private_bank", "run_client_count", "run_dp_summary", "results_note"]

_AUDIT_KEYS = ["set", "n_synthetic", "n_private", "n_reference", "l2_min", "l2_median", "l2_mean", "l2_ref_min",
               "l2_ref_p1", "l2_ref_median", "n_flagged_l2", "flagged_l2", "cos_max", "cos_median", "cos_mean",
               "cos_ref_max", "cos_ref_p99", "cos_ref_median", "n_flagged_cos", "flagged_cos"]


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**20:.3f} MiB" if n >= 2**16 else f"{n / 2**10:.1f} KiB"


def write_communication(weight_uploads: Sequence[dict], safe_uploads: Sequence[dict], dsv_uploads: Sequence[dict],
                        run_dir: Path, mode: str = "model") -> list[dict]:
    """communication.csv/.md: per client and total bytes by kind vs the private shard; returns the rows."""
    rows = upload_summary(weight_uploads, safe_uploads, dsv_uploads)
    keys = ["weights_bytes", "weight_rounds", "safe_images", "safe_bytes", "dsv_images", "dsv_bytes", "total_bytes",
            "shard_bytes"]
    total: dict[str, Any] = {"partition_id": "total", "node_id": ""}
    for k in keys:
        vals = [r.get(k) for r in rows]
        total[k] = sum(int(v) for v in vals if v is not None) if any(v is not None for v in vals) else None
    for r in [*rows, total]:
        shard = r.get("shard_bytes")
        r["upload_vs_shard"] = (r["total_bytes"] / shard) if shard else None
    fields = ["partition_id", "node_id", *keys, "upload_vs_shard"]
    write_dict_csv(run_dir / "communication.csv", fields,
                   ({k: ("" if r.get(k) is None else r.get(k)) for k in fields} for r in [*rows, total]),
                   extrasaction="ignore")
    lines = ["# Communication: bytes uploaded by the clients", "",
             f"privacy.mode: `{mode}`. Payload bytes of what each client chose to send (array buffers, keys, "
             "scalars; no framing), next to the size of its private shard (uint8 images).", "",
             "| client | model weights (rounds) | safe images | DSVs | total | private shard | total / shard |",
             "|---|---|---|---|---|---|---|"]
    for r in [*rows, total]:
        ratio = "" if r["upload_vs_shard"] is None else f"{100 * r['upload_vs_shard']:.2f} %"
        lines.append(f"| {r['partition_id']} | {_fmt_bytes(r['weights_bytes'])} ({r['weight_rounds']}) | "
                     f"{r['safe_images']} = {_fmt_bytes(r['safe_bytes'])} | {r['dsv_images']} = "
                     f"{_fmt_bytes(r['dsv_bytes'])} | {_fmt_bytes(r['total_bytes'])} | {_fmt_bytes(r.get('shard_bytes'))} "
                     f"| {ratio} |")
    if mode == "no_model_access":
        lines += ["", f"Model weights uploaded: {total['weights_bytes'] or 0} bytes (no FedAvg round ran; the clients "
                  "sent DSVs, float32 normalized images, instead)."]
    write_text(run_dir / "communication.md", "\n".join(lines) + "\n")
    return [*rows, total]


def private_bank(scenario: Any, uploaded: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(private normalized images, their positions, meta): federation training images never uploaded.

    ``uploaded``: content keys (``common.records.image_keys``) of the uploaded images; a training
    image whose key is among them is left out of the bank.
    """
    data = federation_train_set(scenario)
    keep = torch.ones(data.train_y.shape[0], dtype=torch.bool)
    if uploaded is not None and uploaded.numel():
        keep = ~torch.from_numpy(np.isin(image_keys(data.train_x).numpy(), uploaded.to(torch.int64).numpy()))
    index = torch.nonzero(keep).flatten()
    return normalize(data.train_x[index], data.meta), index, data.meta


def audit_sets(sets: dict[str, torch.Tensor], private_x: torch.Tensor, reference_x: torch.Tensor,
               model: torch.nn.Module | None, meta: Any, out_dir: Path, device: torch.device,
               n_reference: int = 500, seed: int = 0, labels: dict[str, torch.Tensor] | None = None,
               private_y: torch.Tensor | None = None) -> list[dict]:
    """Audit every set against the private bank; writes one closest-pairs PNG per set; returns CSV rows.

    ``labels`` (set name -> classes) and ``private_y`` put class names into the figures.
    """
    ref = AuditReference.build(private_x, reference_x, model, device=device, n_reference=n_reference, seed=seed)
    rows = []
    for i, (name, x) in enumerate(sets.items()):
        t0 = time.perf_counter()
        res = ref.audit(name, x.to(torch.float32))
        save_closest_pairs_grid(res, x, private_x, meta, out_dir / f"closest_{name}.png", k=min(10, x.shape[0]),
                                syn_y=(labels or {}).get(name), private_y=private_y, title=name,
                                subject="uploaded safe" if name == "safe_pool" else "synthetic")
        rows.append(res.row())
        log(INFO, "privacy audit: set %d/%d %s (%d images) in %.1fs", i + 1, len(sets), name, x.shape[0],
            time.perf_counter() - t0)
    return rows


def _private_labels(scenario: Any, index: torch.Tensor) -> torch.Tensor:
    """Classes of the private bank's images (for the closest-pairs figures)."""
    return federation_train_set(scenario).train_y[index].to(torch.int64)


def _run_audit(inp: PipelineInputs, cells: Sequence[CellResult]) -> tuple[list[dict], float]:
    s, meta, run_dir = inp.scenario, inp.meta, Path(inp.run_dir)
    t0 = time.perf_counter()
    # the pool this run actually used (collected, or reused after its manifest check), keyed by content
    uploaded = image_keys(inp.pool_x) if len(inp.pool_y) else None
    private_x, private_index, _ = private_bank(s, uploaded)
    log(INFO, "privacy audit: private bank of %d images, embedding and distances next", private_x.shape[0])
    model = None
    if inp.model_state is not None:
        model = build_model(meta, dataclasses.asdict(s.model))
        model.load_state_dict(inp.model_state)
        model.eval()
    sets: dict[str, torch.Tensor] = {}
    labels: dict[str, torch.Tensor] = {}
    for c in cells:
        path = c.files.get("synthetic") if c.files else None
        if c.skipped or not path or not Path(path).is_file():
            continue
        art = load_synthetic_artifact(path, dataset=meta.name, cell=(c.method, c.pipc))
        sets[Path(path).stem], labels[Path(path).stem] = art.x, art.y
    dsvs = getattr(inp, "client_dsvs", None)  # no_model_access: each client's own upload, before combining
    for pid, x, y in zip(getattr(dsvs, "partition_ids", []), getattr(dsvs, "x", []), getattr(dsvs, "y", [])):
        sets[f"dsv_client{pid}"], labels[f"dsv_client{pid}"] = x, y
    if len(inp.pool_y):
        sets["safe_pool"] = normalize(inp.pool_x, meta)  # sanity row: real uploaded images
        labels["safe_pool"] = inp.pool_y
    rows = audit_sets(sets, private_x, normalize(inp.test_x, meta), model, meta, run_dir / "privacy", inp.device,
                      n_reference=s.privacy.audit_reference, seed=s.seed, labels=labels,
                      private_y=_private_labels(s, private_index)) if sets else []
    write_dict_csv(run_dir / "privacy_audit.csv", _AUDIT_KEYS, rows, extrasaction="ignore")
    return rows, time.perf_counter() - t0


def _fnum(v: Any, digits: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "n/a" if f != f else f"{f:.{digits}f}"


def run_client_count(run_dir: Path) -> int | None:
    """The clients that uploaded weights in a finished run (uploads.json), None when it does not say."""
    uploads = Path(run_dir) / "uploads.json"
    try:  # a run-folder file: anything unreadable only loses the client count, never the report
        per_client = json.loads(uploads.read_text()).get("per_client", []) if uploads.is_file() else []
        return len({u["partition_id"] for u in per_client if u.get("weights_bytes")}) or None
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return None


def run_dp_summary(s: Any, run_dir: Path) -> dict:
    """dp_summary of a finished run: the clients that uploaded weights and the rounds that ran, from its
    records (empty dict when DP is off)."""
    n_clients = run_client_count(run_dir) or s.federation.num_clients
    return dp_summary(s, n_clients, _rounds_run(Path(run_dir) / "rounds.csv"))


def results_note(s: Any, run_dir: Path) -> str:
    """The run's DP / mode settings, shown under the accuracies they produced (results.md)."""
    dp = run_dp_summary(s, run_dir)
    return f"\nPrivacy: mode `{s.privacy.mode}`; " + (
        f"DP-FedAvg {dp['side']}-side, clipping norm {dp['clipping_norm']}, noise multiplier "
        f"{dp['noise_multiplier']}, {_epsilon_text(dp)}" if dp else "DP off") + " (privacy.md).\n"


def _rounds_run(rounds_csv: Path) -> int | None:
    """The last FedAvg round in rounds.csv (None when the file is missing or unreadable)."""
    try:
        with rounds_csv.open() as fh:
            return max((int(row["round"]) for row in csv.DictReader(fh)), default=None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _epsilon_text(dp: dict) -> str:
    """'epsilon = 3.21 at delta = 1e-05' (or why there is none), for privacy.md and results.md."""
    eps = dp.get("epsilon")
    if eps is None:
        return f"epsilon {dp.get('accounting')}"
    value = "inf" if eps == float("inf") else f"{eps:.3g}"
    return f"epsilon = {value} at delta = {dp['delta']:g}"


def write_privacy_reports(inp: PipelineInputs, cells: Sequence[CellResult]) -> dict[str, Path]:
    """communication.*, privacy_audit.csv (+ PNGs) and privacy.md for a finished grid (see module doc)."""
    s, run_dir = inp.scenario, Path(inp.run_dir)
    mode = s.privacy.mode
    comm = write_communication(inp.weight_uploads, inp.safe_uploads, getattr(inp, "dsv_uploads", []), run_dir, mode)
    total = comm[-1]
    audit_rows: list[dict] = []
    audit_s = 0.0
    if s.privacy.audit:
        audit_rows, audit_s = _run_audit(inp, cells)
        inp.timings["audit"] = audit_s
        log(INFO, "privacy audit: %d sets in %.1fs -> privacy_audit.csv", len(audit_rows), audit_s)
    n_clients = len({u["partition_id"] for u in inp.weight_uploads}) or s.federation.num_clients
    dp = dp_summary(s, n_clients, max((int(r["round"]) for r in inp.rounds), default=None) if inp.rounds else None)
    lines = [f"# Privacy: {s.name}", "", f"- privacy.mode: `{mode}`"]
    if mode == "no_model_access":
        lines.append(f"- clients trained locally, extracted DSVs ({s.privacy.dsv_iterations} DKKT iterations, "
                     f"combined by `{s.privacy.dsv_combine}`) and uploaded them; model weights uploaded: "
                     f"{total['weights_bytes'] or 0} bytes")
    if dp:
        lines.append(f"- DP-FedAvg: {dp['wrapper']}, clipping norm {dp['clipping_norm']}, noise multiplier "
                     f"{dp['noise_multiplier']}, {dp['num_clients']} clients per round, {dp['rounds']} rounds -> "
                     f"Gaussian noise stdev {_fnum(dp['noise_stdev'], 5)} on the averaged weights")
        lines.append(f"- privacy budget: {_epsilon_text(dp)} ({dp['accounting']})")
    else:
        lines.append("- DP-FedAvg: off")
    if inp.rounds:
        lines.append(f"- global model test accuracy after round {inp.rounds[-1]['round']}: "
                     f"{100 * inp.rounds[-1]['test_acc']:.2f} %")
    lines.append(f"- uploaded in total: weights {_fmt_bytes(total['weights_bytes'])}, safe images "
                 f"{total['safe_images']} ({_fmt_bytes(total['safe_bytes'])}), DSVs {total['dsv_images']} "
                 f"({_fmt_bytes(total['dsv_bytes'])}); private data {_fmt_bytes(total.get('shard_bytes'))} "
                 "(communication.md)")
    if audit_rows:
        lines += ["", "## Audit (privacy_audit.csv)", "",
                  "Nearest private (never uploaded) training image of each synthetic image. L2 in normalized pixel "
                  "space (flag: closer than the 1st percentile of held-out test images), cosine in theta*'s "
                  "embedding (flag: above the reference's 99th percentile; n/a without theta*). "
                  "Cost: `audit` in timings.json.", "",
                  "| set | n | L2 min | L2 median | ref L2 p1 | flagged L2 | cos max | ref cos p99 | flagged cos |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in audit_rows:
            lines.append(f"| {r['set']} | {r['n_synthetic']} | {_fnum(r['l2_min'])} | {_fnum(r['l2_median'])} | "
                         f"{_fnum(r['l2_ref_p1'])} | {r['n_flagged_l2']} | {_fnum(r['cos_max'])} | "
                         f"{_fnum(r['cos_ref_p99'])} | {r['n_flagged_cos']} |")
    paths = {"privacy": run_dir / "privacy.md", "communication": run_dir / "communication.md"}
    write_text(paths["privacy"], "\n".join(lines) + "\n")
    # results.md's privacy note comes from results_note(), appended by server.reports.figures.rebuild_report
    # (so `python -m server.report` rebuilds results.md byte-identically).
    if audit_rows:
        paths["audit"] = run_dir / "privacy_audit.csv"
    return paths
