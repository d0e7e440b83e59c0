"""Flower ServerApp: the five phases of one scenario run.

1. federate  FedAvg over the clients; centralized test accuracy of the global model per round
2. collect   query every client for its safe subset until T' holds pool_pipc images per class
3. distill   server.distill.synthesize for every (method, ipc, pipc)       } server.pipeline
4. evaluate  server.evaluate.evaluate_synthetic on each synthetic set       }
5. report    results.md/.csv, rounds.csv, uploads.csv/.json, image grids    }

With ``reuse_artifacts`` set, phases 1-2 are skipped and theta* / T' are loaded from that
run folder. Which scenario runs: ``run_config["scenario"]`` (``flwr run . --run-config
"scenario='scenarios/x.yaml'"``), else ``$FEDPDD_SCENARIO``, else the default scenario;
run-config override keys apply on top (see common.scenario). ``flwr.simulation.
run_simulation`` passes an empty run_config, so in-process runs either set
``$FEDPDD_SCENARIO`` or build their own app with :func:`create_server_app(scenario)`.
"""

from __future__ import annotations

import os

# Before torch loads: libgomp's default busy-waiting makes torch 5-25x slower when the CPU is
# oversubscribed (server + simulated clients + anything else on a few cores). Override by exporting it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import shutil
import time
from contextlib import contextmanager
from collections.abc import Iterator
from logging import INFO
from pathlib import Path

import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.datasets import normalize
from common.device import pick_device
from common.models import build_model
from common.scenario import Scenario, load_scenario, resolve_from_run_config, save_resolved
from edge_client.data import federation_train_set
from server.artifacts import save_model_artifact, save_safe_artifact
from server.collect import collect_safe_pool
from server.evaluate import test_accuracy
from server.federate import run_federation, wait_for_nodes
from server.pipeline import PipelineInputs, load_reused, run_pipeline

__all__ = ["app", "create_server_app", "run_scenario"]


@contextmanager
def _phase(timings: dict[str, float], number: str, name: str, what: str) -> Iterator[None]:
    log(INFO, "phase %s %s: %s ...", number, name, what)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    log(INFO, "phase %s %s: done in %.1fs", number, name, timings[name])


def _copy_history(src: Path, dst: Path) -> None:
    """Keep the reused run's federation records next to the new results (if not the same folder)."""
    if src.resolve() == dst.resolve():
        return
    for name in ("rounds.csv", "rounds.png", "uploads.csv", "uploads.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def run_scenario(grid: Grid, scenario: Scenario) -> Path:
    """Run all phases of ``scenario`` on ``grid``; returns the run folder."""
    run_dir = scenario.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(scenario, run_dir)
    device = pick_device(scenario.device)
    torch.manual_seed(scenario.seed)
    timings: dict[str, float] = {}
    log(INFO, "fedpdd scenario %r (%s) on %s -> %s", scenario.name, scenario.source, device, run_dir)

    data = federation_train_set(scenario)
    meta, test_x, test_y = data.meta, data.test_x, data.test_y
    del data  # the server keeps the test split only; training images live on the clients
    arch = dataclasses.asdict(scenario.model)
    inputs = PipelineInputs(scenario=scenario, meta=meta, model_state=None, pool_x=None, pool_y=None,  # type: ignore[arg-type]
                            test_x=test_x, test_y=test_y, run_dir=run_dir, device=device, timings=timings)

    if scenario.reuse_artifacts:
        src = Path(scenario.reuse_artifacts).expanduser()
        with _phase(timings, "1-2", "reuse", f"loading global_model.pt and safe_pool.pt from {src}"):
            inputs.model_state, inputs.pool_x, inputs.pool_y, _ = load_reused(src, meta, scenario)
            _copy_history(src, run_dir)
    else:
        f = scenario.federation
        with _phase(timings, "1/5", "federate", f"FedAvg, {f.rounds} rounds"):
            nodes = wait_for_nodes(grid, f.num_clients, f.min_clients)
            log(INFO, "federate: %d clients connected", len(nodes))
            initial = build_model(meta, arch, seed=scenario.seed).state_dict()
            eval_model = build_model(meta, arch)
            test_norm = normalize(test_x, meta)

            def central_eval(state: dict) -> tuple[float, float]:
                eval_model.load_state_dict(state)
                return test_accuracy(eval_model, test_norm, test_y, device)

            fed = run_federation(grid, scenario, initial, nodes, central_eval)
            save_model_artifact(run_dir / "global_model.pt", fed.state_dict, arch, meta.name,
                                extra={"rounds": fed.rounds, "scenario": scenario.name})
        inputs.model_state, inputs.rounds, inputs.weight_uploads = fed.state_dict, fed.rounds, fed.uploads

        with _phase(timings, "2/5", "collect", f"{scenario.pool_pipc} safe images per class"):
            pool = collect_safe_pool(grid, nodes, scenario.to_json(), meta.num_classes, scenario.pool_pipc,
                                     seed=scenario.seed, image_shape=meta.image_shape)
            save_safe_artifact(run_dir / "safe_pool.pt", pool.x, pool.y, meta.name,
                               extra={"indices": pool.indices, "partition_ids": pool.partition_ids,
                                      "pipc": pool.pipc, "uploads": pool.uploads})
        inputs.pool_x, inputs.pool_y, inputs.safe_uploads = pool.x, pool.y, pool.uploads

    run_pipeline(inputs)
    log(INFO, "fedpdd scenario %r finished: %s", scenario.name,
        ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return run_dir


def create_server_app(scenario: Scenario | str | Path | None = None) -> ServerApp:
    """A ServerApp bound to ``scenario`` (object or YAML path); None: resolve from the run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if isinstance(scenario, Scenario):
            resolved = scenario
        elif scenario is not None:
            resolved = load_scenario(scenario)
        else:
            resolved = resolve_from_run_config(dict(context.run_config))
        run_scenario(grid, resolved)

    return server_app


app = create_server_app()
