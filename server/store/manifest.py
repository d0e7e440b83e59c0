"""Artifact integrity and phase-level resume.

Every run folder gets a ``manifest.json``::

    {"fingerprint": "<sha256 of the federation-relevant scenario parts>",
     "files": {"global_model.pt": {"sha256": ..., "bytes": ..., "tensors": {"state_dict.conv.weight": [[8, 1, 3, 3], "float32"], ...}},
               "safe_pool.pt": {...}}}

* :func:`fingerprint` hashes what decides theta* and T' (seed, data, federation, model,
  safe policy, faults, pool size). Output folder, distillation and evaluation settings are
  left out: changing them must not force a new federation.
* :func:`record_files` is called right after an artifact was written atomically (temp +
  rename, ``server.store.run_folder.RunFolder``); the manifest itself is written the same way.
* :func:`verify_files` recomputes the hashes; a mismatch raises :class:`ManifestError`
  naming the file (a truncated copy, a manual edit, a different run's file).
* :func:`load_history` gives a resumed run (``server.sweep.cells.resumable_federation`` decides
  whether phases 1-2 are skipped) the rounds, uploads and client failures of the run that
  made the artifacts, so its report equals that of an uninterrupted run.

What the manifest protects against: accidents. A truncated copy, a file from another run or an
edited number shows up as a sha256 mismatch, and a listed file replaced by a symbolic link (say a
cell's ``.pt`` pointing at another cell's set) is refused. It is not a signature: the hashes are
not keyed by a secret kept outside the folder, so whoever can write the folder can edit a file and
recompute its entry. Treat a run folder from someone else as their claim, not as proof.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write_text
from common.scenario import Scenario
from server.store.artifacts import load_torch_file
from server.store.artifacts import load_model_artifact, load_safe_artifact

__all__ = ["MANIFEST", "PHASE12_FILES", "ManifestError", "federation_stamp", "fingerprint", "read_manifest", "record_files",
           "verify_files", "load_history"]

MANIFEST = "manifest.json"
_MAX_MANIFEST_BYTES = 64 << 20
PHASE12_FILES = ("global_model.pt", "safe_pool.pt")


class ManifestError(ValueError):
    """An artifact does not match its manifest entry (or the manifest is unreadable)."""


def federation_stamp(s: Scenario) -> dict:
    """Everything that decides theta* and T': the scenario minus the grid and where/how it runs."""
    d = s.to_dict()
    for key in ("distill", "evaluation", "name", "output_dir", "reuse_artifacts", "device"):
        d.pop(key, None)
    return json.loads(json.dumps({**d, "pool_pipc": s.pool_pipc}, default=str))  # plain JSON values


def fingerprint(scenario: Scenario) -> str:
    """sha256 of the scenario parts that decide phases 1-2 (theta* and the safe pool T').

    The parts of ``federation_stamp`` (which gates the resume, ``server.sweep.cells.resumable_federation``), hashed.
    """
    return hashlib.sha256(json.dumps(federation_stamp(scenario), sort_keys=True, default=str).encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tensor_summary(obj: Any, prefix: str = "", out: dict | None = None) -> dict[str, list]:
    """key path -> [shape, dtype] for every tensor in a (nested) dict: a readable summary."""
    out = {} if out is None else out
    if isinstance(obj, torch.Tensor):
        out[prefix or "<tensor>"] = [list(obj.shape), str(obj.dtype).replace("torch.", "")]
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            if len(out) < 200:  # keep the manifest small
                _tensor_summary(v, f"{prefix}.{k}" if prefix else str(k), out)
    return out


def read_manifest(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(run_dir) / MANIFEST
    if path.is_symlink():
        raise ManifestError(f"{path} is a symbolic link; a run folder's manifest must be its own file")
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise OSError(f"{path.stat().st_size} bytes, over the {_MAX_MANIFEST_BYTES}-byte limit")
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path} is unreadable ({err}); delete it to start the run afresh") from err
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ManifestError(f"{path} is not a fedpdd manifest (no 'files' mapping); delete it to start afresh")
    return data


def _write_manifest(run_dir: Path, data: dict[str, Any]) -> Path:
    return atomic_write_text(run_dir / MANIFEST, json.dumps(data, indent=1, sort_keys=True), root=run_dir)


def record_files(run_dir: str | os.PathLike[str], names: Iterable[str], fp: str | None = None) -> Path:
    """Add (or refresh) the manifest entries of ``names`` (paths relative to ``run_dir``)."""
    run_dir = Path(run_dir)
    data = read_manifest(run_dir) or {"files": {}}
    if fp is not None:
        if data.get("fingerprint") not in (None, fp):
            data["files"] = {}  # a different scenario's entries are stale now
        data["fingerprint"] = fp
    for name in names:
        path = run_dir / name
        try:
            summary = _tensor_summary(load_torch_file(path)) if path.suffix == ".pt" else {}
        except Exception:  # not a torch file: hash only
            summary = {}
        data["files"][name] = {"sha256": _sha256(path), "bytes": path.stat().st_size, "tensors": summary}
    return _write_manifest(run_dir, data)


def verify_files(run_dir: str | os.PathLike[str], names: Iterable[str], required: bool = False) -> None:
    """Raise :class:`ManifestError` naming the first listed file whose bytes changed.

    Files the manifest does not list are skipped unless ``required`` (older runs have no manifest).
    """
    run_dir = Path(run_dir)
    data = read_manifest(run_dir)
    names = list(names)
    if data is None and required and any((run_dir / n).exists() for n in names):
        # no manifest means nothing can be checked: refuse rather than silently trust the files
        raise ManifestError(
            f"{run_dir} holds {', '.join(n for n in names if (run_dir / n).exists())} but no {MANIFEST}: "
            "these files cannot be checked, so they are not used. Rerun the run that made them (or delete "
            "them); if you made them yourself, record them with server.store.manifest.record_files first"
        )
    for name in names:
        entry = (data or {}).get("files", {}).get(name)
        path = run_dir / name
        if entry is None:
            if required:
                raise ManifestError(f"{path} is not listed in {run_dir / MANIFEST}; rerun phases 1-2")
            continue
        if path.is_symlink():
            raise ManifestError(f"{path} is a symbolic link, not the file this run wrote (the manifest lists "
                                "files, links are refused); delete it and the manifest to recompute it")
        if not path.is_file():
            raise ManifestError(f"{path} is listed in {run_dir / MANIFEST} but missing; rerun phases 1-2 "
                                "(delete the manifest) or restore the file")
        digest = _sha256(path)
        if digest != entry.get("sha256"):
            raise ManifestError(
                f"{path} does not match {run_dir / MANIFEST} (sha256 {digest[:12]}… != {str(entry.get('sha256'))[:12]}…, "
                f"{path.stat().st_size} bytes vs {entry.get('bytes')}): the file is corrupt or from another run; "
                "delete it and the manifest to recompute it"
            )


def load_history(run_dir: str | os.PathLike[str], dataset: str) -> dict[str, list]:
    """The phase 1-2 records stored inside the artifacts (rounds, uploads, client failures)."""
    run_dir = Path(run_dir)
    model_extra = load_model_artifact(run_dir / "global_model.pt", dataset=dataset).extra
    safe_extra = load_safe_artifact(run_dir / "safe_pool.pt", dataset=dataset).extra
    return {"rounds": list(model_extra.get("rounds") or []),
            "weight_uploads": list(model_extra.get("weight_uploads") or []),
            "safe_uploads": list(safe_extra.get("uploads") or []),
            "failures": list(safe_extra.get("failures") or [])}
