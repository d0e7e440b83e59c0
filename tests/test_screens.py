"""Poisoned safe images and DSVs are screened per client: the poisoner is dropped and named, never the run.

* through the real message path (``run_simulation`` + ``server.run.run_scenario``, mode ``model``):
  one device relabels its safe images to the next class, another sends one image over and over; both
  are named in failures.csv and the pool is refilled from the honest devices;
* the screens one at a time (no Flower run).
"""

from __future__ import annotations

import builtins
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from common.records import KEY_SAFE, ImageSet
from server.federation.collect import CollectError, duplicate_screen, label_screen, plan_collection
from server.federation.validate import FailureLog
FMNIST = Path("/usr/share/datasets/fashion-mnist")  # a global model that reads the images well enough
NUM_CLIENTS = 4
RELABEL, COPIES = 2, 3


def _hostile_app() -> ClientApp:
    import edge_client.app as real

    app = ClientApp()
    app.train()(real.train)
    app.evaluate()(real.evaluate)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        reply = real.query(msg, context)
        pid = int(context.node_config["partition-id"])
        safe = reply.content[KEY_SAFE]
        x, y = safe["x"].numpy(), safe["y"].numpy()
        if pid == RELABEL and len(y):  # valid labels, every image under the next class's name
            safe["y"] = Array(((y + 1) % 10).astype(np.int64))
        if pid == COPIES and len(y):  # the same image under every label
            safe["x"] = Array(np.ascontiguousarray(np.repeat(x[:1], len(y), axis=0)))
        return reply

    return app


def _run(tmp: Path) -> Path:
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from common.scenario import scenario_from_dict
    from server.run import run_scenario

    scenario = scenario_from_dict({
        "name": "screens", "seed": 3, "device": "cpu", "output_dir": str(tmp / "screens"),
        "data": {"dataset": "fashion-mnist", "root": str(FMNIST), "train_limit": 1000, "test_limit": 200},
        "federation": {"num_clients": NUM_CLIENTS, "rounds": 2, "local_epochs": 1, "batch_size": 32,
                       "min_clients": 2, "lr": 0.05},
        "model": {"width": 8},
        "distill": {"methods": ["random_real"], "ipc": [1], "pipc": [4], "iterations": 2, "real_batch": 4},
        "evaluation": {"epochs": 1, "num_models": 1, "batch_size": 64},
        "privacy": {"audit": False},
    })
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_scenario(grid, scenario)

    mp = pytest.MonkeyPatch()
    mp.setenv("FEDPDD_CACHE", str(tmp / "cache"))
    mp.setenv("FEDPDD_DATA_ROOT", str(FMNIST))
    mp.setattr(builtins, "print", builtins.print)  # Ray swaps in its own print; restore it afterwards
    try:
        run_simulation(server_app=server_app, client_app=_hostile_app(), num_supernodes=NUM_CLIENTS,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        mp.undo()
    return scenario.run_dir


@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
@pytest.mark.slow  # whole Flower simulations (minutes); the in-process tests below cover the same checks
def test_poisoned_safe_images_are_dropped_and_named(tmp_path: Path) -> None:
    from server.store.artifacts import load_safe_artifact

    run_dir = _run(tmp_path)
    assert (run_dir / "results.md").is_file(), "the run finishes with the honest devices"
    rows = list(csv.DictReader((run_dir / "failures.csv").open()))
    named = {int(r["partition_id"]) for r in rows}
    assert named == {RELABEL, COPIES}, rows
    assert all(r["phase"] == "query" and "safe images rejected" in r["reason"] for r in rows), rows
    safe = load_safe_artifact(run_dir / "safe_pool.pt")
    assert torch.bincount(safe.y, minlength=10).tolist() == [4] * 10, "the pool is refilled from the others"
    assert set(safe.extra["partition_ids"].tolist()) == {0, 1}


# ------------------------------------------------------------------ the screens alone


def _images(n: int, labels: list[int], seed: int) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(x=torch.randint(0, 255, (n, 1, 4, 4), generator=g, dtype=torch.uint8),
                    y=torch.tensor(labels, dtype=torch.int64))


def test_label_screen_flags_only_the_odd_client() -> None:
    truth: dict[bytes, int] = {}

    def predict(x: torch.Tensor) -> torch.Tensor:  # a model that is right for every honest image
        return torch.tensor([truth[bytes(im.numpy().tobytes())] for im in x])

    sets = {}
    for node, shift in ((1, 0), (2, 0), (3, 0), (4, 1)):
        im = _images(10, list(range(10)), node)
        for xi, yi in zip(im.x, im.y):
            truth[bytes(xi.numpy().tobytes())] = int(yi)
        sets[node] = [ImageSet(x=im.x, y=(im.y + shift) % 10)]
    flagged = label_screen(predict)(sets)
    assert list(flagged) == [4] and "100% of its 10 images" in flagged[4]
    # two clients: neither is the odd one out
    assert label_screen(predict)({1: sets[1], 4: sets[4]}) == {}


def test_duplicate_screen() -> None:
    im = _images(10, list(range(10)), 0)
    copies = ImageSet(x=im.x[:1].repeat(10, 1, 1, 1), y=im.y)
    assert duplicate_screen()({1: [im], 2: [copies]}) == {2: "9 of its 10 images are copies of its other images"}


def test_a_flagged_client_leaves_the_pool_and_its_share_is_rebalanced() -> None:
    def ask(requests: dict) -> dict:
        from server.federation.collect import SafeReply

        out = {}
        for node, (quota, offset) in requests.items():
            labels = [c for c, q in enumerate(quota) for _ in range(q)]
            out[node] = SafeReply(images=_images(len(labels), labels, 100 * node + sum(offset)),
                                  shortfall=np.zeros(len(quota), np.int64), partition_id=node, num_bytes=0)
        return out

    failures = FailureLog()
    received, _ = plan_collection([0, 1, 2], 2, 6, ask, failures=failures, min_clients=2,
                                  screen=lambda got: {2: "poison"} if 2 in got else {})
    assert received[2] == [] and sum(int(im.y.numel()) for n in (0, 1) for im in received[n]) == 12
    assert [(r["node_id"], r["reason"]) for r in failures.rows] == [(2, "safe images rejected: poison")]
    with pytest.raises(CollectError, match="usable safe images"):
        plan_collection([0, 1, 2], 2, 6, ask, failures=FailureLog(), min_clients=3, screen=lambda got: {2: "x"})


# ------------------------------------------------------------------ poisoned DSVs (mode no_model_access)

SHIFTED = 2


def _dsv_app() -> ClientApp:
    import edge_client.app as real

    app = ClientApp()

    @app.query("dsv")
    def query_dsv(msg: Message, context: Context) -> Message:
        reply = real.query_dsv(msg, context)
        if int(context.node_config["partition-id"]) == SHIFTED:  # every pixel +49, inside the accepted range
            x = reply.content["dsv"]["x"].numpy()
            reply.content["dsv"]["x"] = Array(np.ascontiguousarray(np.minimum(x + 49.0, 49.9).astype(np.float32)))
        return reply

    app.query()(real.query)
    return app


def test_shifted_dsvs_are_dropped_and_named(tmp_path: Path) -> None:
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from common.scenario import scenario_from_dict
    from server.run import run_scenario
    from server.store.artifacts import load_torch_file
    from tests.test_app_e2e import _fake_fashion_mnist

    (tmp_path / "data").mkdir()
    _fake_fashion_mnist(tmp_path / "data", n_train=200, n_test=40)
    scenario = scenario_from_dict({
        "name": "dsvpoison", "seed": 3, "device": "cpu", "output_dir": str(tmp_path / "run"),
        "data": {"dataset": "fashion-mnist", "root": str(tmp_path / "data")},
        "federation": {"num_clients": NUM_CLIENTS, "rounds": 1, "local_epochs": 1, "batch_size": 32, "min_clients": 2},
        "model": {"width": 8},
        "distill": {"methods": ["dsv"], "ipc": [1], "pipc": [1], "iterations": 2},
        "evaluation": {"epochs": 1, "num_models": 1, "batch_size": 64},
        "privacy": {"mode": "no_model_access", "dsv_iterations": 2, "local_epochs": 1, "audit": False,
                    "dsv_combine": "median"},
    })
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_scenario(grid, scenario)

    mp = pytest.MonkeyPatch()
    mp.setenv("FEDPDD_CACHE", str(tmp_path / "cache"))
    mp.setenv("FEDPDD_DATA_ROOT", str(tmp_path / "data"))
    mp.setattr(builtins, "print", builtins.print)  # Ray swaps in its own print; restore it afterwards
    try:
        run_simulation(server_app=server_app, client_app=_dsv_app(), num_supernodes=NUM_CLIENTS,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        mp.undo()
    run_dir = scenario.run_dir
    assert (run_dir / "results.md").is_file()
    rows = list(csv.DictReader((run_dir / "failures.csv").open()))
    assert [(r["phase"], r["partition_id"]) for r in rows] == [("dsv", str(SHIFTED))], rows
    assert "DSVs rejected" in rows[0]["reason"]
    assert load_torch_file(run_dir / "client_dsvs.pt")["partition_ids"] == [0, 1, 3]


def test_dsv_outliers_and_the_median_combine() -> None:
    from server.federation.modes import combine_dsvs, dsv_outliers

    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(2)
    xs = [torch.randn(6, 1, 4, 4, generator=g) * 0.3 for _ in range(4)]
    ys = [y] * 4
    assert dsv_outliers(xs, ys, 3) == {}
    poisoned = xs[:3] + [xs[3] + 49.0]
    assert list(dsv_outliers(poisoned, ys, 3)) == [3]
    assert dsv_outliers(poisoned[2:], ys[2:], 3) == {}, "two clients: neither is the odd one out"
    med, _ = combine_dsvs(poisoned, ys, 2, 3, "median")
    avg, _ = combine_dsvs(poisoned, ys, 2, 3, "average")
    assert med.abs().max() < 2 and avg.abs().max() > 10  # one poisoner moves the average, not the median
