"""The run folder has one owner (server.store.run_folder.RunFolder): attacks on a crafted folder through the
real entry points (``python -m server.report``, ``python -m server.compare``, ``server.run.run_scenario``),
each asserting the honest outcome: nothing written outside the folder, one line and exit 2, the second
writer stopped, an unrelated folder left as it was."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.atomic import UnsafePathError, atomic_write_text
from common.config import ConfigError
from common.datasets import DatasetError, _read_idx
from common.distill.synthesize import SyntheticSet
from common.scenario import save_resolved, scenario_from_dict
from server.run import run_scenario
from server.store.artifacts import ArtifactError, load_model_artifact, load_synthetic_artifact, save_synthetic_artifact
from server.store.manifest import ManifestError, record_files
from server.store.run_folder import RunFolder, RunFolderBusy, RunFolderError
from server.sweep.cells import CELLS_DIR, cell_specs, read_cells

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "FEDPDD_CACHE": os.environ.get("FEDPDD_CACHE", str(ROOT / ".cache" / "fedpdd"))}


def _values(run: Path, **changes: object) -> dict:
    return {"seed": 4, "output_dir": str(run), "distill": {"methods": ["random_real"], "ipc": [1], "pipc": [2],
                                                           "seeds": [4, 5]}, **changes}


def _run_folder(tmp_path: Path, name: str = "run") -> tuple[Path, object]:
    """A finished run folder of two random_real cells (records, sets, manifest, resolved scenario)."""
    run = tmp_path / name
    s = scenario_from_dict(_values(run))
    (run / CELLS_DIR).mkdir(parents=True)
    save_resolved(s, run)
    for spec, acc in zip(cell_specs(s), (0.5, 0.7)):
        syn = SyntheticSet(x=torch.zeros(10, 1, 28, 28), y=torch.arange(10), method="random_real", ipc=1)
        save_synthetic_artifact(run / CELLS_DIR / f"{spec.name}.pt", syn, "fashion-mnist", 2)
        rec = {"format": 1, "cell": {"method": "random_real", "ipc": 1, "pipc": 2, "seed": spec.seed},
               "config": {"k": 1}, "files": {"synthetic": f"{CELLS_DIR}/{spec.name}.pt",
                                             "grid": f"images/{spec.name}.png"},
               "result": {"accuracies": [acc], "mean": acc, "std": 0.0, "distill_s": 1.0, "eval_s": 1.0}}
        (run / CELLS_DIR / f"{spec.name}.json").write_text(json.dumps(rec))
        record_files(run, [f"{CELLS_DIR}/{spec.name}.json", f"{CELLS_DIR}/{spec.name}.pt"])
    return run, s


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=240)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "from click" not in ln]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _report(run: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``python -m server.report RUN --cells-only`` in this process: its exit code and its one stderr line."""
    from server.report import main

    capsys.readouterr()
    rc = main([str(run), "--cells-only"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return rc, lines[0]


def _tree(folder: Path) -> dict[str, bytes | str]:
    return {p.relative_to(folder).as_posix(): (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file()
                                               else "dir") for p in sorted(folder.rglob("*"))}


# ------------------------------------------------------------------ writes: links, confinement


@pytest.mark.parametrize("planted", ["results.md", "images"])
def test_report_never_writes_through_a_link_in_the_folder(tmp_path: Path, planted: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = _run_folder(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "results.md").write_text("victim\n")
    (run / planted).symlink_to(outside / "results.md" if planted == "results.md" else outside)
    before = _tree(outside)
    rc, err = _report(run, capsys)
    assert rc == 2 and planted in err
    assert "symbolic link" in err or "leaves the run folder" in err  # a cell's grid path through the link
    assert _tree(outside) == before  # nothing written, created or replaced outside the run folder


def test_a_write_that_leaves_the_folder_is_refused(tmp_path: Path) -> None:
    run, _ = _run_folder(tmp_path)
    with RunFolder(run) as folder:
        for rel in ("../escaped.txt", str(tmp_path / "escaped.txt"), "cells/../../escaped.txt"):
            with pytest.raises(UnsafePathError, match="outside the run folder|leaves the run folder"):
                folder.write_text(rel, "x")
        with pytest.raises(UnsafePathError, match="symbolic link"):
            (run / "figures").symlink_to(tmp_path)
            atomic_write_text(run / "figures" / "escaped.txt", "x")  # a writer handed a bare path
    assert not (tmp_path / "escaped.txt").exists()


# ------------------------------------------------------------------ checked reads


def test_alias_bomb_in_the_resolved_scenario_is_one_line_and_exit_2(tmp_path: Path) -> None:
    run, _ = _run_folder(tmp_path)
    other, _ = _run_folder(tmp_path, "other")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    (run / "scenario.resolved.yaml").write_text(bomb)
    for proc in (_cli("server.report", str(run), "--cells-only"),
                 _cli("server.compare", str(run), str(other), "--out", str(tmp_path / "cmp"))):
        assert proc.returncode == 2, proc.stderr
        assert "alias" in _one_line(proc) and "scenario.resolved.yaml" in _one_line(proc)


def test_stride_0_tensor_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, s = _run_folder(tmp_path)
    spec = cell_specs(s)[0]
    pt = run / CELLS_DIR / f"{spec.name}.pt"
    huge = torch.zeros(1, 1, 28, 28).expand(10**6, 1, 28, 28)  # 3 KB of storage posing as 3 GB of images
    torch.save({"x": huge, "y": torch.zeros(10**6, dtype=torch.int64), "method": "random_real", "ipc": 1,
                "pipc": 2, "dataset": "fashion-mnist", "info": {}}, pt)
    assert pt.stat().st_size < 10**7
    record_files(run, [f"{CELLS_DIR}/{spec.name}.pt"])  # whoever can write the folder can refresh the manifest
    with pytest.raises(ArtifactError, match="stride"):
        load_synthetic_artifact(pt)
    rc, err = _report(run, capsys)
    assert rc == 2 and "stride" in err


def test_a_cell_set_replaced_by_a_link_to_another_cells_set_is_refused(tmp_path: Path) -> None:
    run, s = _run_folder(tmp_path)
    first, second = (run / CELLS_DIR / f"{spec.name}.pt" for spec in cell_specs(s))
    first.unlink()
    first.symlink_to(second.name)
    with pytest.raises(ManifestError, match="symbolic link"):
        read_cells(run, s)


def test_a_model_arch_out_of_bounds_is_refused_before_building(tmp_path: Path) -> None:
    path = tmp_path / "MODEL.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "arch": {"width": 2_000_000}, "dataset": "fashion-mnist"}, path)
    with pytest.raises(ArtifactError, match="width=2000000 is out of bounds"):
        load_model_artifact(path)


def test_gzip_idx_header_is_bounded_before_inflating(tmp_path: Path) -> None:
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(bomb, "wb") as fh:  # declares 60000 x 2000 x 2000 bytes (240 GB); holds 1 MB of zeros
        fh.write(bytes([0, 0, 8, 3]) + (60000).to_bytes(4, "big") + (2000).to_bytes(4, "big") * 2)
        fh.write(bytes(1 << 20))
    with pytest.raises(DatasetError, match="refused before reading"):
        _read_idx(bomb)
    ok = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(ok, "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([1, 2, 3]))
    assert _read_idx(ok).tolist() == [1, 2, 3]


def test_report_reads_a_run_without_download(tmp_path: Path) -> None:
    from server.reports.figures import load_run_scenario

    run = tmp_path / "run"
    s = scenario_from_dict({**_values(run), "data": {"download": True, "root": str(tmp_path / "made_by_report")}})
    save_resolved(s, run)
    assert load_run_scenario(run).data.download is False


# ------------------------------------------------------------------ one writer, and only into its own folder


def test_a_second_run_into_a_held_folder_stops_naming_the_holder(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = _run_folder(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from server.store.run_folder import RunFolder;"
                               f"RunFolder({str(run)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        manifest = (run / "manifest.json").read_bytes()
        with pytest.raises(RunFolderBusy, match=rf"in use by process {holder.pid}\b"):
            run_scenario(None, scenario_from_dict(_values(run)))  # type: ignore[arg-type] - stops before the grid
        rc, err = _report(run, capsys)
        assert rc == 2 and f"in use by process {holder.pid}" in err
        assert (run / "manifest.json").read_bytes() == manifest
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    with RunFolder(run):  # the lock dies with its holder
        pass


def test_output_dir_at_an_unrelated_non_empty_folder_is_refused_untouched(tmp_path: Path) -> None:
    mine = tmp_path / "thesis"
    (mine / "chapters").mkdir(parents=True)
    (mine / "chapters" / "one.tex").write_text("\\chapter{One}\n")
    (mine / "results.md").write_text("my notes\n")
    before = _tree(mine)
    with pytest.raises(RunFolderError, match="not empty and holds no fedpdd run"):
        run_scenario(None, scenario_from_dict(_values(mine)))  # type: ignore[arg-type]
    assert _tree(mine) == before


def test_other_settings_stop_with_the_fix_an_identical_run_resumes(tmp_path: Path) -> None:
    run, _ = _run_folder(tmp_path)
    changed = scenario_from_dict(_values(run, evaluation={"epochs": 7}))
    with pytest.raises(RunFolderError, match=r"other settings \(evaluation.epochs\).*distill.resume=false"):
        run_scenario(None, changed)  # type: ignore[arg-type]
    RunFolder(run).open_for_run(scenario_from_dict(_values(run))).release()  # identical: resumes
    grid_only = _values(run)
    grid_only["distill"] = {**grid_only["distill"], "seeds": [4, 5, 6], "workers": 2}
    RunFolder(run).open_for_run(scenario_from_dict(grid_only)).release()  # more cells of the same study: resumes
    recompute = _values(run, evaluation={"epochs": 7})
    recompute["distill"] = {**recompute["distill"], "resume": False}
    RunFolder(run).open_for_run(scenario_from_dict(recompute)).release()  # asked to recompute: allowed


@pytest.mark.parametrize("values", [{"name": ".."}, {"name": "a/../.."}, {"output_dir": "runs/../.."}])
def test_names_that_leave_the_output_root_are_refused(values: dict) -> None:
    with pytest.raises(ConfigError, match="name|output_dir"):
        scenario_from_dict(values)


# ------------------------------------------------------------------ one writer


WRITE_CALLS = re.compile(r"os\.replace\(|\.write_text\(|\.write_bytes\(|\.open\(\s*[\"'][wax]|\bopen\([^)]*[\"'][wax]b?[\"']"
                         r"|\.savefig\(\s*(?!fh\b)|shutil\.copy|tmp\.replace\(|os\.fdopen\(")
# The primitive (common/atomic.py) and the run folder's owner write files; the dataset cache
# (common/datasets.py) writes outside any run folder, into $FEDPDD_CACHE.
WRITERS = {"common/atomic.py", "server/store/run_folder.py", "common/datasets.py"}


def test_only_the_owner_writes_files() -> None:
    bad = []
    for sub in ("common", "server"):
        for path in sorted((ROOT / sub).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in WRITERS:
                continue
            for no, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if WRITE_CALLS.search(code) and not code.strip().startswith(("\"", "'", "``")):
                    bad.append(f"{rel}:{no}: {line.strip()}")
    assert not bad, "write through server.store.run_folder / common.atomic instead:\n" + "\n".join(bad)


def test_a_cell_set_copied_from_another_cell_is_refused_by_the_report(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run, s = _run_folder(tmp_path)
    spec = cell_specs(s)[0]
    pt = run / CELLS_DIR / f"{spec.name}.pt"
    syn = SyntheticSet(x=torch.zeros(10, 1, 28, 28), y=torch.arange(10), method="dm", ipc=1)
    save_synthetic_artifact(pt, syn, "fashion-mnist", 50)  # a dm set of pipc 50 under a random_real pipc-2 name
    record_files(run, [f"{CELLS_DIR}/{spec.name}.pt"])  # the manifest refreshed as well: only the contents tell
    rc, err = _report(run, capsys)
    assert rc == 2 and "another cell's set" in err and spec.name in err


def test_pipeline_cli_refuses_an_unrelated_output_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from server.pipeline import main

    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"\xff\xd8 not a run")
    before = _tree(mine)
    scenario = tmp_path / "s.yaml"
    scenario.write_text("name: s\n")
    assert main([str(scenario), "--reuse", str(tmp_path / "nowhere"), "--output-dir", str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty and holds no fedpdd run" in err[0]
    assert _tree(mine) == before


def test_a_view_of_a_larger_tensor_is_saved_on_its_own_and_reads_back(tmp_path: Path) -> None:
    from server.store.artifacts import load_safe_artifact, save_safe_artifact

    big = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8)
    path = save_safe_artifact(tmp_path / "safe_pool.pt", big[10:20], torch.arange(10), "fashion-mnist")
    assert path.stat().st_size < 100 * 784  # not the whole storage of `big`
    assert torch.equal(load_safe_artifact(path).x, big[10:20])


def test_a_folder_of_an_older_version_resumes_while_new_settings_stay_at_their_defaults(tmp_path: Path) -> None:
    """A key that a newer version added is absent from an older folder's scenario.resolved.yaml and
    federation.json: at its default it changes nothing, so the folder resumes; set otherwise, it is a difference."""
    import json as _json

    import yaml as _yaml

    from server.store.manifest import federation_stamp
    from server.sweep.cells import resumable_federation

    run, s = _run_folder(tmp_path)
    stored = _yaml.safe_load((run / "scenario.resolved.yaml").read_text())
    del stored["federation"]["strategy"], stored["distill"]["executor"]  # as written before these settings existed
    (run / "scenario.resolved.yaml").write_text(_yaml.safe_dump(stored))
    stamp = federation_stamp(s)
    del stamp["federation"]["strategy"]
    (run / "federation.json").write_text(_json.dumps(stamp))
    for name in ("global_model.pt", "safe_pool.pt"):
        (run / name).touch(exist_ok=True)
    RunFolder(run).open_for_run(scenario_from_dict(_values(run))).release()  # today's defaults: resumes
    assert resumable_federation(s)
    other = scenario_from_dict(_values(run, federation={"strategy": "fedmedian"}))
    with pytest.raises(RunFolderError, match=r"other settings \(federation.strategy\)"):
        RunFolder(run).open_for_run(other)
    assert not resumable_federation(other)
