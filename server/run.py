"""One scenario run on a Flower grid: the five phases.

1. federate  FedAvg over the clients; centralized test accuracy of the global model per round
2. collect   query every client for its safe subset until T' holds pool_pipc images per class
3. distill   common.distill.synthesize for every (method, ipc, pipc)       } server.pipeline
4. evaluate  common.evaluate.evaluate_synthetic on each synthetic set       }
5. report    results.md/.csv, rounds.csv, uploads.csv/.json, image grids    }

With ``reuse_artifacts`` set, phases 1-2 are skipped and theta* / T' are loaded from that
run folder; a run folder whose federation settings match (``federation.json``) resumes after
them; ``privacy.mode: no_model_access`` replaces them by client DSVs (server.federation.modes).
"""


from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.datasets import DatasetMeta, normalize
from common.device import pick_device
from common.models import build_model
from common.datasets import federation_train_set
from common.scenario import Scenario, apply_device_profile, check_resources, save_resolved
from server.store.artifacts import save_model_artifact, save_safe_artifact
from server.federation.collect import collect_safe_pool
from common.evaluate import test_accuracy
from server.federation.federate import finite_outputs, run_federation, wait_for_nodes
from server.pipeline import load_reused, run_pipeline
from server.sweep.inputs import PipelineInputs
from server.store.manifest import PHASE12_FILES, fingerprint, load_history, verify_files
from server.store.run_folder import RunFolder
from server.federation.validate import FailureLog, shard_plan
from server.preflight import check_data_root, check_data_size
from server.sweep.cells import pool_quota, resumable_federation, write_federation_stamp
from common.grid import pipc_label
from server.federation.modes import federate_without_model

__all__ = ["run_scenario"]


@contextmanager
def _phase(timings: dict[str, float], number: str, name: str, what: str) -> Iterator[None]:
    log(INFO, "phase %s %s: %s ...", number, name, what)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    log(INFO, "phase %s %s: done in %.1fs", number, name, timings[name])


def _copy_history(src: Path, dst: RunFolder) -> None:
    """Keep the reused run's federation records next to the new results (if not the same folder)."""
    if src.resolve() == dst.root.resolve():
        return
    for name in ("rounds.csv", "rounds.png", "uploads.csv", "uploads.json"):
        if (src / name).is_file():
            data = RunFolder(src).read_bytes(name)  # a regular file of the reused run, no link
            dst.write(name, lambda fh, data=data: fh.write(data))


@dataclass
class _Federated:
    """What phases 1-2 hand to the pipeline."""

    model_state: OrderedDict[str, torch.Tensor]
    pool_x: torch.Tensor
    pool_y: torch.Tensor
    rounds: list[dict] = field(default_factory=list)
    weight_uploads: list[dict] = field(default_factory=list)
    safe_uploads: list[dict] = field(default_factory=list)
    client_dsvs: object | None = None  # privacy.mode no_model_access: server.federation.modes.ClientDSVs (model_state is None)
    dsv_uploads: list[dict] = field(default_factory=list)


def _federate_and_collect(grid: Grid, scenario: Scenario, meta: DatasetMeta, test_x: torch.Tensor,
                          test_y: torch.Tensor, device: torch.device, timings: dict[str, float],
                          quota: tuple[int, bool] | None = None, failures: FailureLog | None = None,
                          train_y: torch.Tensor | None = None,
                          val: tuple[torch.Tensor, torch.Tensor] | None = None) -> _Federated:
    """Phases 1 (FedAvg) and 2 (safe pool); saves global_model.pt and safe_pool.pt."""
    f, run_dir = scenario.federation, scenario.run_dir
    arch = dataclasses.asdict(scenario.model)
    with _phase(timings, "1/5", "federate", f"FedAvg, {f.rounds} rounds"):
        nodes = wait_for_nodes(grid, f.num_clients, f.min_clients, source=scenario.source)
        log(INFO, "federate: %d clients connected", len(nodes))
        # every reply is bounded by the shard the client was dealt (server/federation/validate.py)
        plan = shard_plan(scenario, train_y, len(nodes), meta.num_classes) if train_y is not None else None
        initial = build_model(meta, arch, seed=scenario.seed).state_dict()
        eval_model = build_model(meta, arch)
        test_norm = normalize(test_x, meta)

        def central_eval(state: dict[str, torch.Tensor]) -> tuple[float, float]:
            eval_model.load_state_dict(state)
            return test_accuracy(eval_model, test_norm, test_y, device)

        val_eval = None
        if val is not None:
            val_norm, val_y = normalize(val[0], meta), val[1]

            def val_eval(state: dict[str, torch.Tensor]) -> float:
                eval_model.load_state_dict(state)
                return test_accuracy(eval_model, val_norm, val_y, device)[0]

        probe = finite_outputs(eval_model, test_norm[:64])  # inputs only: finite outputs, never an accuracy
        fed = run_federation(grid, scenario, initial, nodes, central_eval, failures=failures, plan=plan,
                             val_eval=val_eval, probe=probe)
        save_model_artifact(run_dir / "global_model.pt", fed.state_dict, arch, meta.name,
                            extra={"rounds": fed.rounds, "scenario": scenario.name, "weight_uploads": fed.uploads})
        RunFolder(run_dir).record(["global_model.pt"], fingerprint(scenario))  # sha256 + shapes, checked on reuse

    pool_pipc, allow_short = quota or (scenario.pool_pipc, False)  # server.sweep.cells.pool_quota: pipc 'all'
    with _phase(timings, "2/5", "collect", f"{pipc_label(scenario.pool_pipc)} safe images per class"):
        theta = build_model(meta, arch).to(device)
        theta.load_state_dict(fed.state_dict)
        theta.eval()

        def predict(x: torch.Tensor) -> torch.Tensor:  # theta*'s class for each safe image (the label screen)
            with torch.no_grad():
                return theta(normalize(x, meta).to(device)).argmax(1).cpu()

        pool = collect_safe_pool(grid, nodes, scenario.to_json(), meta.num_classes, pool_pipc, allow_short=allow_short,
                                 seed=scenario.seed, image_shape=meta.image_shape, partition_of=fed.node_partitions,
                                 timeout=f.reply_timeout_s, failures=failures, min_clients=f.min_clients, plan=plan,
                                 predict=predict)
        save_safe_artifact(run_dir / "safe_pool.pt", pool.x, pool.y, meta.name,
                           extra={"keys": pool.keys, "partition_ids": pool.partition_ids,
                                  "pipc": -1 if allow_short else pool.pipc, "uploads": pool.uploads,
                                  "failures": list(failures.rows) if failures is not None else []})
        RunFolder(run_dir).record(["safe_pool.pt"], fingerprint(scenario))
    return _Federated(model_state=fed.state_dict, pool_x=pool.x, pool_y=pool.y, rounds=fed.rounds,
                      weight_uploads=fed.uploads, safe_uploads=pool.uploads)


def run_scenario(grid: Grid, scenario: Scenario) -> Path:
    """Run all phases of ``scenario`` on ``grid``, holding the run folder's lock; returns the run folder.

    The folder must be empty, or a fedpdd run with the same settings (it resumes), or the scenario
    must ask to recompute (``distill.resume: false``); see ``server.store.run_folder.RunFolder.open_for_run``."""
    for warning in check_resources(scenario):  # refuses before the run folder exists when memory cannot fit
        log(WARNING, "%s", warning)
    device = pick_device(scenario.device)
    scenario, profile = apply_device_profile(scenario, device.type)  # stated in the resolved scenario and records
    folder = RunFolder(scenario.run_dir).open_for_run(scenario)  # locked until the run ends
    try:
        return _run_phases(grid, scenario, folder, device, profile)
    finally:
        folder.release()


def _run_phases(grid: Grid, scenario: Scenario, folder: RunFolder, device: torch.device, profile: dict) -> Path:
    run_dir = folder.root
    save_resolved(scenario, run_dir)
    torch.manual_seed(scenario.seed)
    timings: dict[str, float] = {}
    log(INFO, "fedpdd scenario %r (%s) on %s -> %s", scenario.name, scenario.source, device, run_dir)
    log(INFO, "device %s: profile %s", device, profile or "(every profile setting given explicitly)")

    failures = FailureLog()  # clients that failed, per phase (failures.csv, results.md)
    check_data_root(scenario)  # before loading: the loader would silently fall back to other places
    data = federation_train_set(scenario)
    check_data_size(scenario, int(data.train_y.shape[0]))
    meta, test_x, test_y = data.meta, data.test_x, data.test_y
    score_x, score_y = data.scoring_split(scenario.evaluation.split)  # the cells' split: test, or validation
    val = (data.val_x, data.val_y) if data.val_x is not None else None  # judges the plateau of FedAvg
    quota = pool_quota(scenario, data.train_y, meta.num_classes)  # only class counts, for pipc 'all'
    train_y = data.train_y  # labels only: the shard plan that bounds client replies
    del data  # the server keeps the held-out splits only; training images live on the clients

    resume_src = run_dir if resumable_federation(scenario) else None  # same federation settings: reuse them
    if scenario.reuse_artifacts or resume_src:
        src = resume_src or Path(scenario.reuse_artifacts).expanduser()
        with _phase(timings, "1-2", "reuse", f"loading global_model.pt and safe_pool.pt from {src}"):
            verify_files(src, PHASE12_FILES, required=True)  # sha256 against src/manifest.json; none: refused
            state, pool_x, pool_y, _ = load_reused(src, meta, scenario)
            _copy_history(src, folder)
        done = _Federated(model_state=state, pool_x=pool_x, pool_y=pool_y)
        if resume_src:  # an interrupted run: its phase 1-2 records, so the report matches an uninterrupted one
            history = load_history(src, meta.name)
            failures.rows = history.pop("failures")
            done = dataclasses.replace(done, **history)
    elif scenario.privacy.mode == "no_model_access":
        try:
            nm = federate_without_model(grid, scenario, meta, timings, failures, train_y)
        finally:  # say who failed, also when too few clients answered
            failures.write(run_dir)
        done = _Federated(model_state=None, pool_x=nm.pool.x, pool_y=nm.pool.y,  # type: ignore[arg-type]
                          safe_uploads=nm.pool.uploads, client_dsvs=nm.dsvs, dsv_uploads=nm.dsv_uploads)
    else:
        try:
            done = _federate_and_collect(grid, scenario, meta, test_x, test_y, device, timings, quota, failures,
                                         train_y, val)
        finally:  # also when too few clients answered: say who failed, keep what was written
            failures.write(run_dir)
        write_federation_stamp(scenario)  # lets an interrupted sweep resume without re-federating

    run_pipeline(PipelineInputs(
        scenario=scenario, meta=meta, model_state=done.model_state, pool_x=done.pool_x, pool_y=done.pool_y,
        test_x=score_x, test_y=score_y, run_dir=run_dir, device=device, rounds=done.rounds,
        weight_uploads=done.weight_uploads, safe_uploads=done.safe_uploads, timings=timings,
        client_dsvs=done.client_dsvs, dsv_uploads=done.dsv_uploads,
    ))
    failures.write(run_dir)  # failures.csv + the 'Client failures' section of results.md
    log(INFO, "fedpdd scenario %r finished: %s", scenario.name, ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return run_dir
