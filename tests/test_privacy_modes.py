"""Privacy-constrained modes end to end (tiny data, flwr.simulation.run_simulation) and their parts.

* no_model_access: the server never receives an ArrayRecord of model weights, no train message
  is sent, clients answer ``query.dsv`` with float DSVs; dm / dsv / blend / dm_from_dsv run.
* pipc 0 + client-side DP-FedAvg end to end: tests/test_privacy_dp.py (own file: < 60 s each).
* the audit, at pipeline level, flags an exact copy of a private image planted into S and does
  not flag random noise.
"""

from __future__ import annotations

import builtins
import csv
import threading
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_app_e2e import _fake_fashion_mnist

NUM_CLIENTS = 2


class RecordingGrid:
    """Wraps the real Grid; records every message sent and every reply received."""

    def __init__(self, grid) -> None:  # noqa: ANN001 - flwr Grid
        self._grid = grid
        self.sent: list = []
        self.replies: list = []
        self._lock = threading.Lock()

    def send_and_receive(self, messages, *args, **kwargs):  # noqa: ANN001, ANN201
        messages = list(messages)
        with self._lock:
            self.sent.extend(messages)
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        with self._lock:
            self.replies.extend(replies)
        return replies

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._grid, name)


def _base(tmp_path: Path, name: str) -> dict:
    return {
        "name": name, "seed": 1, "device": "cpu", "output_dir": str(tmp_path / name),
        "data": {"dataset": "fashion-mnist", "root": str(tmp_path / "data")},
        "federation": {"num_clients": NUM_CLIENTS, "rounds": 1, "local_epochs": 1, "batch_size": 32},
        "model": {"width": 8},
        "distill": {"methods": ["dm"], "ipc": [1], "pipc": [2], "iterations": 2, "real_batch": 4},
        "evaluation": {"epochs": 1, "num_models": 1, "batch_size": 64},
        "privacy": {"audit_reference": 50},
    }


def _simulate(tmp_path: Path, values: dict) -> tuple[Path, RecordingGrid]:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from common.scenario import load_scenario
    from edge_client.app import app as client_app
    from server.run import run_scenario

    file = tmp_path / f"{values['name']}.yaml"
    file.write_text(yaml.safe_dump(values))
    scenario = load_scenario(file)
    holder: dict[str, RecordingGrid] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        holder["grid"] = RecordingGrid(grid)
        run_scenario(holder["grid"], scenario)  # type: ignore[arg-type]

    mp = pytest.MonkeyPatch()
    mp.setenv("FEDPDD_CACHE", str(tmp_path / "cache"))
    mp.setenv("FEDPDD_DATA_ROOT", str(scenario.data.root))  # the simulated devices' own data folder
    mp.setattr(builtins, "print", builtins.print)  # Ray swaps in its own print; restore it afterwards
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=NUM_CLIENTS,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        mp.undo()
    assert "grid" in holder, "the ServerApp did not run"
    return scenario.run_dir, holder["grid"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("privacy_modes")
    (tmp / "data").mkdir()
    _fake_fashion_mnist(tmp / "data", n_train=120, n_test=60)
    return tmp


@pytest.fixture(scope="module")
def no_model_run(data_dir: Path) -> tuple[Path, RecordingGrid]:
    values = _base(data_dir, "nomodel")
    values["distill"]["methods"] = ["dm", "dsv", "blend", "dm_from_dsv"]
    values["privacy"].update({"mode": "no_model_access", "dsv_iterations": 2, "local_epochs": 1})
    return _simulate(data_dir, values)


def _is_model_record(record) -> bool:  # noqa: ANN001
    # Model weights: the ConvNet's parameter names; image sets / DSVs hold only x, y (, indices).
    return not set(record.keys()) <= {"x", "y", "indices"}


def test_no_model_access_never_uploads_weights(no_model_run: tuple[Path, RecordingGrid]) -> None:
    run_dir, grid = no_model_run
    types = {m.metadata.message_type for m in grid.sent}
    assert types == {"query.dsv", "query"}, types  # no train / evaluate round at all
    assert grid.replies and not any(r.has_error() for r in grid.replies)
    for reply in grid.replies:
        for key, record in reply.content.array_records.items():
            assert not _is_model_record(record), f"reply from node {reply.metadata.src_node_id} carries weights ({key})"
    dsv_replies = [r for r in grid.replies if "dsv" in r.content.array_records]
    assert len(dsv_replies) == NUM_CLIENTS
    x = dsv_replies[0].content.array_records["dsv"]["x"].numpy()
    assert x.dtype.name == "float32" and x.shape == (10, 1, 28, 28)
    assert not (run_dir / "global_model.pt").exists()
    with (run_dir / "communication.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    total = rows[-1]
    assert total["partition_id"] == "total" and int(total["weights_bytes"]) == 0
    assert int(total["dsv_bytes"]) > 0 and int(total["dsv_images"]) == 10 * NUM_CLIENTS
    with (run_dir / "uploads.csv").open() as fh:
        kinds = {r["kind"] for r in csv.DictReader(fh)}
    assert kinds == {"dsv", "safe_images"}
    md = (run_dir / "results.md").read_text()
    for method in ("dm", "dsv", "blend", "dm_from_dsv"):
        assert f" {method} " in md
    with (run_dir / "privacy_audit.csv").open() as fh:
        audit = {r["set"]: r for r in csv.DictReader(fh)}
    # 4 synthetic sets + the safe pool + each client's own DSVs (audited before they are combined)
    assert "safe_pool" in audit and len(audit) == 5 + NUM_CLIENTS
    assert {f"dsv_client{p}" for p in range(NUM_CLIENTS)} <= set(audit)
    assert all(int(audit[f"dsv_client{p}"]["n_synthetic"]) == 10 for p in range(NUM_CLIENTS))
    from server.store.manifest import read_manifest

    listed = read_manifest(run_dir)["files"]  # the DSVs and every cell record feed reported numbers
    assert {"client_dsvs.pt", "safe_pool.pt"} <= set(listed) and any(k.startswith("cells/") for k in listed)
    assert all(r["cos_max"] in ("nan", "") for r in audit.values())  # no theta* on the server: pixel audit only
    assert "no_model_access" in (run_dir / "privacy.md").read_text()


# ---------------------------------------------------------------- parts, no Flower run


def test_combine_dsvs_average_and_select() -> None:
    from server.federation.modes import combine_dsvs

    y = torch.arange(3).repeat_interleave(2)
    a, b = torch.zeros(6, 1, 2, 2), torch.ones(6, 1, 2, 2) * 2
    b[torch.arange(6)] += torch.arange(6).view(6, 1, 1, 1).float()
    x, yy = combine_dsvs([a, b], [y, y], ipc=2, num_classes=3, how="average")
    assert torch.equal(yy, y) and torch.allclose(x, b / 2)
    x, yy = combine_dsvs([a, b], [y, y], ipc=2, num_classes=3, how="select")
    assert torch.equal(x[0], a[0]) and torch.equal(x[1], b[0]) and torch.equal(x[2], a[2])  # slot j -> client j mod 2


def test_dsv_records_are_validated() -> None:
    from common.records import dsvs_to_record, record_to_dsvs

    y = torch.arange(2).repeat_interleave(1)
    x = torch.randn(2, 1, 4, 4)
    got_x, got_y = record_to_dsvs(dsvs_to_record(x, y), 2, 1, (1, 4, 4))
    assert torch.equal(got_x, x) and torch.equal(got_y, y)
    for bad in (x.clone().fill_(float("nan")), x * 1e4):
        with pytest.raises(ValueError, match="NaN|normalized"):
            record_to_dsvs(dsvs_to_record(bad, y), 2, 1, (1, 4, 4))
    with pytest.raises(ValueError, match="every class"):
        record_to_dsvs(dsvs_to_record(x, torch.zeros(2, dtype=torch.int64)), 2, 1, (1, 4, 4))
    from flwr.app import Array, ArrayRecord

    rec = ArrayRecord({"x": Array((x * 0).to(torch.uint8).numpy()), "y": Array(y.numpy())})
    with pytest.raises(ValueError, match="float32"):
        record_to_dsvs(rec, 2, 1, (1, 4, 4))


def test_privacy_scenario_validation() -> None:
    from common.scenario import ScenarioError, scenario_from_dict

    with pytest.raises(ScenarioError, match="needs the trained model"):
        scenario_from_dict({"distill": {"methods": ["dkkt_dm"]}, "privacy": {"mode": "no_model_access"}})
    with pytest.raises(ScenarioError, match="privacy.dp.side"):
        scenario_from_dict({"privacy": {"dp": {"enabled": True, "side": "middle"}}})
    with pytest.raises(ScenarioError, match="privacy.dp.clipping_norm"):
        scenario_from_dict({"privacy": {"dp": {"clipping_norm": 0}}})
    s = scenario_from_dict({"distill": {"methods": ["blend", "dm_from_dsv"]}, "privacy": {"mode": "no_model_access"}})
    assert s.privacy.audit and s.privacy.dp.enabled is False


def test_dp_wrap_picks_flower_wrapper() -> None:
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideFixedClipping,
        FedAvg,
    )

    from common.scenario import scenario_from_dict
    from server.federation.dp import dp_summary, dp_wrap

    inner = FedAvg()
    off = scenario_from_dict({})
    assert dp_wrap(inner, off, 4) is inner and dp_summary(off, 4) == {}
    for side, cls in (("server", DifferentialPrivacyServerSideFixedClipping),
                      ("client", DifferentialPrivacyClientSideFixedClipping)):
        s = scenario_from_dict({"privacy": {"dp": {"enabled": True, "side": side, "clipping_norm": 2.0,
                                                   "noise_multiplier": 0.5}}})
        wrapped = dp_wrap(inner, s, 4)
        assert isinstance(wrapped, cls) and wrapped.clipping_norm == 2.0 and wrapped.noise_multiplier == 0.5
        assert dp_summary(s, 4)["noise_stdev"] == pytest.approx(0.5 * 2.0 / 4)


def test_audit_pipeline_flags_planted_private_copy(data_dir: Path) -> None:
    """Pipeline level: the private bank excludes uploaded images; a planted copy is found, noise is not."""
    from common.scenario import scenario_from_dict
    from common.datasets import federation_train_set
    from common.datasets import normalize
    from server.reports.privacy_report import audit_sets, private_bank

    mp = pytest.MonkeyPatch()
    mp.setenv("FEDPDD_CACHE", str(data_dir / "cache"))
    try:
        s = scenario_from_dict(_base(data_dir, "audit"))
        data = federation_train_set(s)
        from common.records import image_keys

        uploaded = image_keys(data.train_x[[0, 5, 7]])  # uploads are known by content, not by index
        private_x, index, meta = private_bank(s, uploaded)
    finally:
        mp.undo()
    assert private_x.shape[0] == data.train_y.shape[0] - 3 and not set(index.tolist()) & {0, 5, 7}
    gen = torch.Generator().manual_seed(0)
    planted = torch.randn(4, *meta.image_shape, generator=gen)
    planted[2] = normalize(data.train_x[11], meta)  # an image that stayed private
    noise = torch.randn(4, *meta.image_shape, generator=gen)
    rows = audit_sets({"planted": planted, "noise": noise}, private_x, normalize(data.test_x, meta), None, meta,
                      data_dir / "audit_out", torch.device("cpu"), n_reference=50)
    by = {r["set"]: r for r in rows}
    assert by["planted"]["l2_min"] == 0.0 and by["planted"]["flagged_l2"] == "2"
    assert by["noise"]["n_flagged_l2"] == 0
    assert (data_dir / "audit_out" / "closest_planted.png").is_file()


def test_dm_from_dsv_starts_from_the_given_dsvs() -> None:
    from torch import nn

    from common.distill.synthesize import DistillConfig, synthesize

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 3)

        def embed(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x)).flatten(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.embed(x))

    def factory(gen: torch.Generator) -> nn.Module:
        torch.manual_seed(int(torch.randint(0, 1000, (1,), generator=gen)))
        return Net()

    safe_x, safe_y = torch.randn(12, 1, 8, 8), torch.arange(3).repeat_interleave(4)
    dsv = torch.randn(3, 1, 8, 8)
    kw = dict(ipc=1, num_classes=3, image_shape=(1, 8, 8), pipc=4, safe_x=safe_x, safe_y=safe_y, embed_factory=factory,
              seed=0, device="cpu", progress=False)
    out = synthesize("dm_from_dsv", model=None, config=DistillConfig(iterations=0, real_batch=4), dsv_x=dsv, **kw)
    assert torch.equal(out.x, dsv) and out.info["dm"]["init"] == "given (DSVs)"  # 0 iterations: the DSVs
    out = synthesize("dm_from_dsv", model=None, config=DistillConfig(iterations=2, real_batch=4), dsv_x=dsv, **kw)
    assert not torch.equal(out.x, dsv) and out.method == "dm_from_dsv"
    with pytest.raises(ValueError, match="dm_from_dsv"):
        synthesize("dm_from_dsv", model=None, config=DistillConfig(iterations=1), dsv_x=None, **kw)
