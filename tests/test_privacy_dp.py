"""Zero safe data (pipc 0) + client-side DP-FedAvg end to end (tiny data, run_simulation).

No safe-image query is sent and no image is uploaded; Flower's client-side fixed-clipping wrapper
sends the clipping norm with every train message (the clients clip with fixedclipping_mod); the
clipping norm and noise multiplier are recorded in privacy.md and results.md.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tests.test_app_e2e import _fake_fashion_mnist
from tests.test_privacy_modes import NUM_CLIENTS, RecordingGrid, _base, _simulate


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("privacy_dp")
    (tmp / "data").mkdir()
    _fake_fashion_mnist(tmp / "data", n_train=120, n_test=60)
    return tmp


@pytest.fixture(scope="module")
def zero_safe_dp_run(data_dir: Path) -> tuple[Path, RecordingGrid]:
    values = _base(data_dir, "zerodp")
    values["distill"].update({"methods": ["dsv"], "pipc": [0]})
    values["privacy"]["dp"] = {"enabled": True, "side": "client", "clipping_norm": 0.5, "noise_multiplier": 0.3}
    return _simulate(data_dir, values)


def test_zero_safe_uploads_no_images_and_dp_is_recorded(zero_safe_dp_run: tuple[Path, RecordingGrid]) -> None:
    run_dir, grid = zero_safe_dp_run
    types = [m.metadata.message_type for m in grid.sent]
    assert "query" not in types and "train" in types  # no safe-image query when pipc is 0
    for reply in grid.replies:
        assert "safe" not in reply.content.array_records
    # client-side DP: the wrapper sent the clipping norm with every train message
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert all(m.content.config_records["config"]["clipping_norm"] == 0.5 for m in train_msgs)
    safe = torch.load(run_dir / "safe_pool.pt", weights_only=True)
    assert safe["x"].shape[0] == 0
    with (run_dir / "communication.csv").open() as fh:
        total = list(csv.DictReader(fh))[-1]
    assert int(total["safe_images"]) == 0 and int(total["safe_bytes"]) == 0 and int(total["weights_bytes"]) > 0
    privacy = (run_dir / "privacy.md").read_text()
    assert "clipping norm 0.5" in privacy and "noise multiplier 0.3" in privacy
    assert "noise multiplier 0.3" in (run_dir / "results.md").read_text()
    # epsilon of the rounds that ran, at privacy.dp.delta, in both files (or why it could not be computed)
    from server.federation.dp import dp_epsilon

    rounds = max(int(r["round"]) for r in csv.DictReader((run_dir / "rounds.csv").open()))
    eps, how = dp_epsilon(0.3, rounds, NUM_CLIENTS, 1e-5)
    expected = f"epsilon = {eps:.3g} at delta = 1e-05" if eps is not None else f"epsilon {how}"
    assert f"- privacy budget: {expected} ({how})" in privacy
    assert expected in (run_dir / "results.md").read_text()
    with (run_dir / "privacy_audit.csv").open() as fh:
        audit = list(csv.DictReader(fh))
    assert len(audit) == 1 and audit[0]["set"].startswith("dsv_ipc1_pipc0")  # no safe pool, no sanity row
