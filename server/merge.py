"""``python -m server.merge A B [...] --out C``: one run folder from the shards of a grid.

Each shard ran part of one scenario's grid (``distill.cells`` / ``distill.shard``, e.g.
``python -m server.pipeline S.yaml --reuse FED --shard 1/2`` on one machine and ``--shard 2/2`` on
another). The merge checks that the folders belong together and copies their cells into C:

- the same federation stamp (``server.store.manifest.federation_stamp``: what decides theta* and
  T') and the same scenario apart from where and how it ran (name, output folder, device,
  executor, workers, the shard itself);
- every cell record and synthetic set checked against its folder's manifest (sha256);
- the same inputs in every cell (the digests of theta*, the test split) across the folders;
- a cell present in two folders must be the same cell: the same record (apart from its
  wall-clock timings) and the same synthetic set, else the merge is refused.

C gets the first folder's scenario (without the shard), its phase 1-2 artifacts when it has
them, every cell, a manifest listing them, and the tables and figures rebuilt from the cells
(``server.reports.figures.rebuild_report``, as ``python -m server.report C --cells-only``), so
they equal a single-machine run's. Every refusal: one line naming the folder and the fix, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.config import ConfigError
from common.scenario import Scenario, save_resolved
from server.reports.figures import load_run_scenario, rebuild_report
from server.store.manifest import PHASE12_FILES, ManifestError, federation_stamp, verify_files
from server.store.artifacts import MAX_TORCH_FILE_BYTES, load_synthetic_artifact
from server.store.run_folder import RunFolder
from server.sweep.cells import CELLS_DIR, CellRecordError, CellSpec, cell_specs, read_cells, tensor_digest

__all__ = ["MergeError", "comparable_record", "merge", "main"]

# What may differ between the shards of one study: where and how each ran, and the part it ran.
_RUN_KEYS = ("name", "output_dir", "reuse_artifacts", "device")
_DISTILL_RUN_KEYS = ("cells", "shard", "executor", "workers", "ray_address", "ray_max_retries", "ray_gpus", "resume")
_TIMINGS = ("distill_s", "eval_s")


class MergeError(ValueError):
    """The folders cannot be merged; the message names the folder and the fix."""


def _study(s: Scenario) -> dict:
    d = json.loads(json.dumps(s.to_dict(), default=str))
    for key in _RUN_KEYS:
        d.pop(key, None)
    for key in _DISTILL_RUN_KEYS:
        d["distill"].pop(key, None)
    return d


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in _diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _set_digest(path: Path, dataset: str) -> str:
    art = load_synthetic_artifact(path, dataset=dataset)
    return tensor_digest(art.x, art.y)


def comparable_record(rec: dict) -> dict:
    """A cell record without what differs between two runs of the same cell (wall-clock timings)."""
    rec = json.loads(json.dumps(rec))
    for key in _TIMINGS:
        (rec.get("result") or {}).pop(key, None)

    def strip(info: Any) -> None:  # wall_s of the cell (and of blend's sub-runs), elapsed_s of each history row
        if isinstance(info, dict):
            info.pop("wall_s", None)
            info.pop("elapsed_s", None)
            for value in info.values():
                strip(value)
        elif isinstance(info, list):
            for value in info:
                strip(value)

    strip(rec.get("info"))
    return rec


def _copy(src: Path, dst: RunFolder, rel: str) -> None:
    """Copy one file (a regular file, no link) into the merged folder through its owner."""
    data = RunFolder(src.parent).read_bytes(src.name, limit=MAX_TORCH_FILE_BYTES)
    dst.write(rel, lambda fh: fh.write(data))


def merge(sources: Sequence[Path], out: Path) -> dict[str, Path]:
    """Merge the run folders ``sources`` into ``out`` (see the module docstring); returns what was written."""
    if len(sources) < 2:
        raise MergeError("give at least two run folders to merge")
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        raise MergeError(f"{out} exists and is not empty; give a new folder with --out")
    scenarios: list[Scenario] = []
    for src in sources:
        try:
            scenarios.append(load_run_scenario(src))
        except (FileNotFoundError, ConfigError) as err:
            raise MergeError(f"{src}: {str(err).splitlines()[0]}") from None
    first, base = sources[0], scenarios[0]
    for src, s in zip(sources[1:], scenarios[1:]):
        keys = _diff(federation_stamp(base), federation_stamp(s))
        if keys:
            raise MergeError(f"{src} comes from another federation than {first} (federation stamp differs in "
                             f"{', '.join(keys[:6])}); merge only shards of one study")
        keys = _diff(_study(base), _study(s))
        if keys:
            raise MergeError(f"{src} ran another study than {first} (scenario differs in {', '.join(keys[:6])}); "
                             "merge only shards of one scenario")
    full = dataclasses.replace(base, distill=dataclasses.replace(base.distill, cells=None, shard=None),
                               output_dir=str(out))
    chosen: dict[str, tuple[Path, dict, str | None]] = {}  # cell name -> (folder, record, sha256 of its set)
    inputs: tuple[Path, dict] | None = None
    for src, s in zip(sources, scenarios):
        try:
            cells = read_cells(src, full)  # every record and set checked against the folder's manifest
        except (ManifestError, CellRecordError) as err:
            raise MergeError(str(err).splitlines()[0]) from None
        for cell in cells:
            name = CellSpec(cell.method, cell.ipc, cell.pipc, cell.seed).name
            rec = json.loads((src / CELLS_DIR / f"{name}.json").read_text())
            pt = src / CELLS_DIR / f"{name}.pt"
            # the set's images and labels (its info holds wall-clock timings, so the file's bytes differ)
            digest = _set_digest(pt, base.data.dataset) if pt.is_file() else None
            given = {k: v for k, v in ((rec.get("config") or {}).get("inputs") or {}).items() if k in ("model", "test")}
            if inputs is None:
                inputs = (src, given)
            elif given != inputs[1]:
                raise MergeError(f"{src / CELLS_DIR / (name + '.json')} was distilled from another theta* or test split "
                                 f"than the cells of {inputs[0]}; run every shard from one federation "
                                 "(python -m server.pipeline SCENARIO --reuse FOLDER)")
            if name in chosen:
                other, other_rec, other_digest = chosen[name]
                keys = _diff(comparable_record(other_rec), comparable_record(rec))
                if keys or digest != other_digest:
                    what = ", ".join(keys[:4]) if keys else "the synthetic set"
                    raise MergeError(f"cell {name} differs between {other} and {src} (in {what}); delete the wrong "
                                     "copy's cells/" + name + ".* or rerun that cell")
                continue
            chosen[name] = (src, rec, digest)
    if not chosen:
        raise MergeError(f"none of {', '.join(map(str, sources))} holds a cell of the grid; nothing to merge")

    folder = RunFolder(out)
    if out.is_dir() and not RunFolder.is_run(out) and any(out.iterdir()):
        raise MergeError(f"{out} is not empty and holds no fedpdd run; merge into a new or empty folder")
    with folder:
        return _merge_into(folder, full, first, chosen)


def _merge_into(folder: RunFolder, full: Scenario, first: Path, chosen: dict[str, tuple]) -> dict[str, Path]:
    out = folder.root
    save_resolved(full, out)
    listed: list[str] = []
    have_phase12 = [f for f in PHASE12_FILES if (first / f).is_file()]
    if have_phase12:
        try:
            verify_files(first, have_phase12, required=True)
        except ManifestError as err:
            raise MergeError(str(err).splitlines()[0]) from None
        for f in have_phase12:
            _copy(first / f, folder, f)
        listed += have_phase12
        if (first / "federation.json").is_file():
            _copy(first / "federation.json", folder, "federation.json")
    for name, (src, _, digest) in chosen.items():
        for suffix in (".pt", ".json"):  # the set before its record, as the sweep writes them
            if suffix == ".pt" and digest is None:
                continue
            _copy(src / CELLS_DIR / f"{name}{suffix}", folder, f"{CELLS_DIR}/{name}{suffix}")
            listed.append(f"{CELLS_DIR}/{name}{suffix}")
    folder.record(listed)
    order = {spec.name: i for i, spec in enumerate(cell_specs(full))}
    missing = [n for n in order if n not in chosen]
    written = rebuild_report(out)
    written["cells"] = out / CELLS_DIR
    if missing:
        print(f"server.merge: {len(missing)} of the grid's {len(order)} cells are in none of the folders "
              f"(first: {missing[0]}); the report shows what is there", file=sys.stderr)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders of the shards")
    parser.add_argument("--out", type=Path, required=True, help="the merged run folder (new or empty)")
    args = parser.parse_args(argv)
    try:
        written = merge(args.folders, args.out)
    except MergeError as err:
        print(f"server.merge: {err}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        print(f"{kind}: {path}")
    print(f"server.merge: merged {len(args.folders)} folders into {args.out}; python -m server.report {args.out} "
          "rebuilds the run files (rounds, privacy audit) too")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
