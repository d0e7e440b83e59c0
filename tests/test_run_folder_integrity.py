"""Run-folder integrity: one checked loading path, every reported number hashed in the manifest,
paths confined to the run folder, no manifest = not trusted (issue #13, items 1-2)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from common.scenario import scenario_from_dict
from server.store.artifacts import ArtifactError, load_safe_artifact, save_synthetic_artifact
from common.distill.synthesize import SyntheticSet
from server.store.manifest import ManifestError, record_files
from server.sweep.cells import CELLS_DIR, CellRecordError, _resumable, cell_specs, read_cells

ROOT = Path(__file__).resolve().parents[1]
# The one module allowed to call torch.load (server.store.artifacts.load_torch_file), and the one that
# may unpickle (common.datasets' restricted CIFAR unpickler). Stand-alone experiment scripts may
# call torch.load on files they wrote, with weights_only=True spelled out.
TORCH_LOAD_OK = {"server/store/artifacts.py"}
SCRIPTS_OK: set[str] = set()  # none left; scenarios/core_result.py saves with torch.save only
PICKLE_OK = {"common/datasets.py"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            yield node, node.func.value.id, node.func.attr


def _kw(node: ast.Call, name: str) -> object:
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def test_no_load_bypasses_the_checked_loaders() -> None:
    bad = []
    for sub in ("common", "server", "edge_client", "scenarios", "bench"):
        for path in sorted((ROOT / sub).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            tree = ast.parse(path.read_text(), rel)
            for node, mod, attr in _calls(tree):
                where = f"{rel}:{node.lineno}"
                if mod == "torch" and attr == "load":
                    if _kw(node, "weights_only") is not True:
                        bad.append(f"{where}: torch.load without weights_only=True")
                    elif rel not in TORCH_LOAD_OK | SCRIPTS_OK:
                        bad.append(f"{where}: torch.load outside server.store.artifacts.load_torch_file")
                if mod == "pickle" and attr in ("load", "loads", "Unpickler") and rel not in PICKLE_OK:
                    bad.append(f"{where}: pickle.{attr}")
                if mod in ("np", "numpy") and attr == "load" and _kw(node, "allow_pickle") not in (None, False):
                    bad.append(f"{where}: np.load(allow_pickle=...)")
            for node in ast.walk(tree):  # `from pickle import load` style imports sneak past the call check
                if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "cloudpickle") \
                        and rel not in PICKLE_OK:
                    bad.append(f"{rel}:{node.lineno}: from {node.module} import ...")
    assert not bad, "\n".join(bad)


class _Payload:
    """Unpickling this would create ``marker``: proves whether a planted pickle runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_planted_pickle_in_safe_pool_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"x": torch.zeros(1, 1, 28, 28, dtype=torch.uint8), "y": torch.zeros(1, dtype=torch.int64),
                "dataset": "fashion-mnist", "extra": {"indices": _Payload(marker)}}, tmp_path / "safe_pool.pt")
    with pytest.raises(ArtifactError, match=r"safe_pool.pt cannot be read .*weights only"):
        load_safe_artifact(tmp_path / "safe_pool.pt")
    assert not marker.exists(), "the planted payload ran"


# ------------------------------------------------------------------ cell records


def _cell_folder(tmp_path: Path, accs: tuple[float, ...] = (0.5, 0.7)) -> tuple[Path, object, Path]:
    s = scenario_from_dict({"seed": 4, "distill": {"methods": ["random_real"], "ipc": [1], "pipc": [2]}})
    spec = cell_specs(s)[0]
    run = tmp_path / "run"
    (run / CELLS_DIR).mkdir(parents=True)
    syn = SyntheticSet(x=torch.zeros(10, 1, 28, 28), y=torch.arange(10), method="random_real", ipc=1)
    save_synthetic_artifact(run / CELLS_DIR / f"{spec.name}.pt", syn, "fashion-mnist", 2)
    mean = sum(accs) / len(accs)
    std = (sum((a - mean) ** 2 for a in accs) / len(accs)) ** 0.5
    rec = {"format": 1, "cell": {"method": "random_real", "ipc": 1, "pipc": 2, "seed": 4}, "config": {"k": 1},
           "files": {"synthetic": f"{CELLS_DIR}/{spec.name}.pt", "grid": f"images/{spec.name}.png"},
           "result": {"accuracies": list(accs), "mean": mean, "std": std, "distill_s": 1.0, "eval_s": 1.0}}
    path = run / CELLS_DIR / f"{spec.name}.json"
    path.write_text(json.dumps(rec))
    record_files(run, [f"{CELLS_DIR}/{spec.name}.json", f"{CELLS_DIR}/{spec.name}.pt"])
    return run, s, path


def _edit(path: Path, change) -> None:  # noqa: ANN001
    rec = json.loads(path.read_text())
    change(rec)
    path.write_text(json.dumps(rec))


def test_a_listed_cell_reads_back(tmp_path: Path) -> None:
    run, s, _ = _cell_folder(tmp_path)
    (cell,) = read_cells(run, s)
    assert cell.accuracies == [0.5, 0.7] and cell.mean == pytest.approx(0.6)
    assert Path(cell.files["grid"]).parent == (run / "images").resolve()


def test_an_edited_accuracy_is_refused_naming_the_file(tmp_path: Path) -> None:
    run, s, path = _cell_folder(tmp_path)

    def to_99(rec: dict) -> None:
        rec["result"].update(accuracies=[0.99, 0.99], mean=0.99, std=0.0)

    _edit(path, to_99)
    with pytest.raises(ManifestError, match=rf"{path.name} does not match .*manifest.json.*delete it"):
        read_cells(run, s)
    # resume does not trust it either: the cell is recomputed
    assert _resumable(run, cell_specs(s)[0], {"k": 1}) is None


def test_a_record_missing_from_the_manifest_or_no_manifest_is_refused(tmp_path: Path) -> None:
    run, s, path = _cell_folder(tmp_path)
    (run / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=rf"{path.name} but no manifest.json"):
        read_cells(run, s)
    (run / "other.txt").write_text("x")
    record_files(run, ["other.txt"])  # a manifest exists again, but it does not list the record
    with pytest.raises(ManifestError, match=rf"{path.name} is not listed"):
        read_cells(run, s)


@pytest.mark.parametrize("change, match", [
    (lambda rec: rec["files"].update(grid="../../x/y.png"), "leaves the run folder"),
    (lambda rec: rec["files"].update(synthetic="/etc/passwd"), "leaves the run folder"),
    (lambda rec: rec["cell"].update(ipc="many"), r"(?s)malformed.*ipc"),
    (lambda rec: rec["result"].update(accuracies=[2.0, 0.7]), r"(?s)malformed.*accuracies"),
    (lambda rec: rec["result"].update(mean=0.99), "do not follow from its accuracies"),
    (lambda rec: rec.pop("result"), "neither a result nor a skip reason"),
])
def test_a_malformed_record_is_refused_naming_the_file(tmp_path: Path, change, match: str) -> None:  # noqa: ANN001
    run, s, path = _cell_folder(tmp_path)
    _edit(path, change)
    record_files(run, [f"{CELLS_DIR}/{path.name}"])  # even with a manifest that agrees (the attacker rehashed)
    with pytest.raises(CellRecordError, match=match) as err:
        read_cells(run, s)
    assert str(path) in str(err.value)
    assert not (tmp_path / "x").exists()


def test_a_truncated_record_names_the_file(tmp_path: Path) -> None:
    run, s, path = _cell_folder(tmp_path)
    path.write_text(path.read_text()[:40])
    record_files(run, [f"{CELLS_DIR}/{path.name}"])
    with pytest.raises(CellRecordError, match=rf"{path.name} cannot be read as a cell record \(JSONDecodeError"):
        read_cells(run, s)


def test_report_cli_refuses_a_grid_path_outside_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from common.scenario import save_resolved
    from server.report import main

    run, s, path = _cell_folder(tmp_path)
    save_resolved(s, run)
    _edit(path, lambda rec: rec["files"].update(grid="../../x/y.png"))
    record_files(run, [f"{CELLS_DIR}/{path.name}"])
    assert main([str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "leaves the run folder" in err[0]
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()


def test_audit_uses_the_pool_the_run_used_not_a_file_left_in_the_folder(tmp_path: Path) -> None:
    """A planted or stale safe_pool.pt in the output folder is neither executed nor trusted by the audit."""
    from types import SimpleNamespace

    from common.records import image_keys
    from common.datasets import federation_train_set
    from server.reports.privacy_report import _run_audit
    from tests.test_app_e2e import _fake_fashion_mnist

    (tmp_path / "data").mkdir()
    _fake_fashion_mnist(tmp_path / "data", n_train=120, n_test=40)
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"x": torch.zeros(1, 1, 28, 28, dtype=torch.uint8), "y": torch.zeros(1, dtype=torch.int64),
                "dataset": "fashion-mnist", "extra": {"indices": _Payload(marker)}}, run / "safe_pool.pt")
    s = scenario_from_dict({"data": {"dataset": "fashion-mnist", "root": str(tmp_path / "data")},
                            "privacy": {"audit_reference": 20}, "output_dir": str(run)})
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDPDD_CACHE", str(tmp_path / "cache"))
    try:
        data = federation_train_set(s)
        pool_x, pool_y = data.train_x[:20], data.train_y[:20]  # the pool this run actually used
        inp = SimpleNamespace(scenario=s, meta=data.meta, run_dir=run, pool_x=pool_x, pool_y=pool_y,
                              model_state=None, test_x=data.test_x, device=torch.device("cpu"), timings={})
        rows, _ = _run_audit(inp, [])
    finally:
        mp.undo()
    assert not marker.exists(), "the planted safe_pool.pt ran"
    (row,) = rows
    assert row["set"] == "safe_pool" and int(row["n_private"]) == 120 - len(set(image_keys(pool_x).tolist()))
