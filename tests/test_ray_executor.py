"""distill.executor ray on a real two-node Ray cluster on this machine (a head and a worker node,
ray.cluster_utils.Cluster, both on this machine's address): the cells equal the process pool's byte for byte, the records
are the same, the tasks run on both nodes, and a node that dies mid-sweep has its chains run again
on the other node."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from server.merge import comparable_record
from server.pipeline import run_grid
from server.store.artifacts import load_synthetic_artifact
from tests.test_sweep import META, _inputs

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.slow  # start-up of two Ray nodes + three small sweeps: ~1-2 min on 2 loaded cores

GRID = {"methods": ["dm", "dkkt_dm", "random_real"], "ipc": [1], "pipc": [3], "seeds": [0, 1]}


def _record(path: Path) -> dict:
    """A cell record without what differs between any two runs (its wall-clock timings)."""
    return comparable_record(json.loads(path.read_text()))


def _sweep(tmp_path: Path, name: str, **distill) -> tuple[dict, dict, list[str]]:
    inp = _inputs(tmp_path, {**GRID, **distill}, name=name)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("flwr").addHandler(handler)
    try:
        cells = run_grid(inp, progress=False)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    sets = {(c.method, c.seed): (c.accuracies, load_synthetic_artifact(c.files["synthetic"], dataset=META.name).x)
            for c in cells}
    records = {p.name: _record(p) for p in sorted((inp.run_dir / "cells").glob("*.json"))}
    return sets, records, lines


@pytest.fixture(scope="module")
def cluster():
    t0 = time.perf_counter()
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    startup = time.perf_counter() - t0
    yield c, worker, startup
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


def test_ray_cells_equal_the_process_pool_and_survive_a_lost_node(tmp_path, cluster):
    c, worker, startup = cluster
    reference, ref_records, _ = _sweep(tmp_path, "pool", workers=2)
    assert len(reference) == 6 and len(ref_records) == 6

    t0 = time.perf_counter()
    on_ray, ray_records, lines = _sweep(tmp_path, "ray", executor="ray", ray_address=c.address, workers=0)
    ray_s = time.perf_counter() - t0
    assert on_ray.keys() == reference.keys()
    for key, (acc, x) in reference.items():
        assert on_ray[key][0] == acc, key
        assert torch.equal(on_ray[key][1], x), key
    assert ray_records == ref_records  # the same records, written by this process alone
    assert any("Ray tasks ran on 2 nodes" in line for line in lines), lines  # both nodes computed chains
    assert sum("distill + evaluate ..." in line for line in lines) == 6, lines  # the workers' lines came back

    # A node dies while it computes a chain: Ray runs that chain again on the head node.
    done: dict = {}

    def sweep() -> None:
        done["result"] = _sweep(tmp_path, "lost", executor="ray", ray_address=c.address, workers=0, ray_max_retries=3)

    th = threading.Thread(target=sweep)
    th.start()
    deadline = time.monotonic() + 10 * (startup + ray_s)  # the scale of this machine's Ray, measured above
    while time.monotonic() < deadline and ray.is_initialized() is False:
        time.sleep(0.05)
    while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) > 0:
        time.sleep(0.02)  # both CPUs leased: one chain runs on the worker node
    assert time.monotonic() < deadline, "the sweep never occupied both nodes"
    c.remove_node(worker)
    th.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not th.is_alive(), "the sweep did not finish after losing a node"
    lost, lost_records, lost_lines = done["result"]
    for key, (acc, x) in reference.items():
        assert lost[key][0] == acc, key
        assert torch.equal(lost[key][1], x), key
    assert lost_records == ref_records
    print(f"ray cluster start-up {startup:.1f}s, ray sweep {ray_s:.1f}s")
