"""Shared test settings and fixtures."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny tensors: thread start-up dominates and a loaded 2-core CI box thrashes with more threads.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def tiny_dkkt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run folder (dm + dkkt_dm, ipc 1, pipc 3, width 8, 400 training images) whose theta* is ONE
    gradient-descent step from theta_0 (the scenario-seeded network) on the whole training view:
    theta* - theta_0 = -0.01 * sum_i grad L_i(theta_0), so the real data meet the stationarity condition
    at theta_0 exactly. Built without Flower (phases 1-2 replaced by that step)."""
    if not FMNIST.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # a session fixture runs outside _one_torch_thread
    try:
        return _build_tiny_dkkt_run(tmp_path_factory.mktemp("tiny_dkkt") / "run")
    finally:
        torch.set_num_threads(previous)


def _build_tiny_dkkt_run(run_dir: Path) -> Path:
    import dataclasses

    import torch.nn.functional as F

    from common.datasets import federation_train_set, normalize
    from common.models import build_model
    from common.scenario import load_scenario, save_resolved
    from server.federation.collect import pool_subset
    from server.pipeline import run_grid
    from server.store.artifacts import save_model_artifact, save_safe_artifact
    from server.store.manifest import PHASE12_FILES, record_files
    from server.sweep.inputs import PipelineInputs

    overrides = {
        "output_dir": str(run_dir), "device": "cpu", "data.train_limit": 400, "data.test_limit": 100,
        "model.width": 8, "distill.methods": ["dm", "dkkt_dm"], "distill.ipc": [1], "distill.pipc": [3],
        "distill.iterations": 2, "distill.workers": 1, "evaluation.epochs": 1, "evaluation.num_models": 1,
        "distill.diagnose_path_points": 3, "evaluation.width": 8, "evaluation.depth": 2, "distill.seeds": [0],
    }
    s = load_scenario(Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.yaml", overrides=overrides)
    save_resolved(s, run_dir)
    data = federation_train_set(s)
    meta = data.meta
    arch = dataclasses.asdict(s.model)
    model = build_model(meta, arch, seed=s.seed)  # theta_0, as server.pipeline rebuilds it
    loss = F.cross_entropy(model(normalize(data.train_x, meta)), data.train_y, reduction="sum")
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= 0.01 * g
    order = torch.argsort(data.train_y, stable=True)
    pool_x, pool_y = pool_subset(data.train_x[order], data.train_y[order], 3, meta.num_classes)
    save_model_artifact(run_dir / "global_model.pt", model.state_dict(), arch, meta.name)
    save_safe_artifact(run_dir / "safe_pool.pt", pool_x, pool_y, meta.name, extra={"pipc": 3})
    record_files(run_dir, PHASE12_FILES)
    run_grid(PipelineInputs(scenario=s, meta=meta, model_state=model.state_dict(), pool_x=pool_x, pool_y=pool_y,
                            test_x=data.test_x, test_y=data.test_y, run_dir=run_dir, device=torch.device("cpu")),
             progress=False)
    return run_dir
