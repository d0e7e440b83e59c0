"""Compute the sweep's chains as Ray tasks on a cluster (``distill.executor: ray``).

The same chains as the process pool (server/sweep/cell_pool.py), computed by the same code
(``_compute_chain``) from the same inputs, so every cell's result is byte-identical to the
process pool's; only where they run differs.

- Connecting: the Ray runtime this process already runs is reused (under ``flwr run`` /
  ``run_simulation`` Flower's simulation backend has called ``ray.init`` in the ServerApp's own
  process, ``flwr.server.superlink.fleet.vce.backend.raybackend``), else ``ray.init`` connects to
  ``distill.ray_address``, else to ``$RAY_ADDRESS``, else Ray's own lookup (a cluster started with
  ``ray start`` on this machine, or a new local instance). A process can hold one Ray connection,
  so a sweep inside a Flower simulation reaches a cluster by pointing Flower's backend at it
  (``init_args`` ``address``); ``distill.ray_address`` then has no effect and the log says so.
- Resources: each chain is one task with 1 CPU (one intra-op thread, as a process-pool worker)
  and ``distill.ray_gpus`` GPUs on a cuda device. In a runtime that Flower started, the client
  actors hold every CPU for the whole run (Flower fills the cluster with one actor per
  ``client-resources num-cpus``, idle once the federation is over), so there the chains reserve no
  CPU and ``distill.workers`` (default: the cluster's CPUs) bounds how many run at once.
- Shared inputs (theta*, the uint8 pools, the test split, the factories) go into the object store
  once (``ray.put``); a worker process deserializes them once and keeps them for its next chains.
- One writer: a task returns its chain's outcomes, its log records and (for a cell that failed on a
  NaN) the last good state; this process records them (``on_cell``) and writes that state to the
  run folder. A task never touches the run folder: its checkpoints go to a scratch folder of the
  worker.
- A worker or node that dies takes its task with it; Ray runs the task again elsewhere (up to
  ``distill.ray_max_retries`` times). Cells are pure functions of their inputs and seeds, so a
  retried chain gives the same result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from common.distill.synthesize import DistillationError
from common.threads import setup_process
from common.atomic import atomic_torch_save
from server.store.artifacts import load_torch_file
from server.sweep.cell_pool import _LOGGER, Chain, CellOutcome, SharedInputs, _CellTag, _compute_chain, run_order

__all__ = ["connect", "run_ray_chains"]

_log = logging.getLogger(_LOGGER)


def connect(address: str | None) -> tuple[Any, bool]:
    """(the ray module, True when the runtime was already running in this process) after connecting."""
    import ray

    if ray.is_initialized():
        if address:
            _log.warning("sweep: this process already runs Ray (Flower's simulation backend); distill.ray_address "
                         "%r has no effect: point Flower's backend at the cluster (init_args address) instead",
                         address)
        return ray, True
    root = str(Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join([root, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)])
    # the workers import common/ and server/ from the project root (on other nodes: where it is installed)
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, log_to_driver=True)
    return ray, False


# ---------------------------------------------------------------- inside a Ray worker process

_CACHE: dict[str, SharedInputs] = {}  # object id -> the shared inputs, deserialized once per worker process


class _Collect(logging.Handler):
    """Keep a chain's log records (message resolved, picklable) to send back with its outcomes."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args, record.exc_info, record.exc_text = record.getMessage(), None, None, None
        self.records.append(record)


def _shared_inputs(box: list) -> SharedInputs:
    import ray

    key = box[0].hex()
    if key not in _CACHE:
        _CACHE.clear()  # one sweep at a time: the previous sweep's inputs are not needed any more
        shared = ray.get(box[0])
        if shared.device.type == "cuda":  # Ray shows the task only its own GPUs, numbered from 0
            shared = dataclasses.replace(shared, device=torch.device("cuda"))
        _CACHE[key] = shared
    return _CACHE[key]


def _ray_chain(box: list, chain: Chain) -> tuple[list[CellOutcome], list[logging.LogRecord], dict[int, dict], str]:
    """One chain in a Ray worker: (outcomes, log records, index -> last good state of a failed cell, node id)."""
    import ray

    setup_process("worker")
    shared = _shared_inputs(box)
    logger = logging.getLogger(_LOGGER)
    collect = _Collect()
    collect.addFilter(_CellTag())
    logger.handlers[:] = [collect]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    with tempfile.TemporaryDirectory(prefix="fedpdd-chain-") as scratch:
        local = dataclasses.replace(chain, tasks=[dataclasses.replace(t, checkpoint_path=Path(scratch) / t.checkpoint_path.name)
                                                  for t in chain.tasks])
        outcomes = list(_compute_chain(shared, local))
        states = {i: load_torch_file(o.error.checkpoint) for i, o in enumerate(outcomes)
                  if o.error is not None and o.error.checkpoint is not None and Path(o.error.checkpoint).is_file()}
    logger.handlers[:] = []
    return outcomes, collect.records, states, ray.get_runtime_context().get_node_id()


# ---------------------------------------------------------------- in the server process


def _restore_checkpoint(outcome: CellOutcome, chain: Chain, state: dict) -> CellOutcome:
    """Write a failed cell's last good state where the process pool would have, and name that path."""
    err = outcome.error
    assert err is not None
    target = next(t.checkpoint_path for t in chain.tasks if t.spec == outcome.spec)
    target = target.with_name(Path(err.checkpoint).name)  # blend's sub-runs add _dsv / _dm to the name
    atomic_torch_save(state, target)
    moved = DistillationError(str(err).replace(str(err.checkpoint), str(target)), iteration=err.iteration,
                              terms=err.terms, checkpoint=target)
    return dataclasses.replace(outcome, error=moved)


def run_ray_chains(shared: SharedInputs, chains: Sequence[Chain], workers: int, on_cell: Callable[[CellOutcome], None],
                   address: str | None = None, max_retries: int = 3, gpus: float = 1.0) -> None:
    """Compute every chain as a Ray task; ``on_cell`` runs in this process for each finished cell.

    ``workers`` > 0 bounds the chains in flight (0: as many as the cluster has CPUs). A chain that
    still fails after ``max_retries`` reruns raises here with its first cell named; cells already
    handed to ``on_cell`` are kept.
    """
    ray, reused = connect(address)
    try:
        _run(ray, reused, shared, chains, workers, on_cell, max_retries, gpus)
    finally:
        if not reused:
            ray.shutdown()  # this sweep's own connection (a runtime this process already ran stays)


def _run(ray: Any, reused: bool, shared: SharedInputs, chains: Sequence[Chain], workers: int,
         on_cell: Callable[[CellOutcome], None], max_retries: int, gpus: float) -> None:
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # Flower's idle client actors hold every CPU of the runtime it started: then the chains reserve none
    reserve = not reused or ray.available_resources().get("CPU", 0) >= 1
    limit = workers if workers > 0 else max(1, cpus)
    resources = {"num_cpus": 1 if reserve else 0, "num_gpus": gpus if shared.device.type == "cuda" else 0}
    task = ray.remote(_ray_chain).options(max_retries=max_retries, **resources)
    _log.info("sweep: %d chains as Ray tasks (%s, %d CPUs in %d nodes, at most %d at once, %s each%s)", len(chains),
              "the Ray runtime this process runs" if reused else f"cluster {ray.get_runtime_context().gcs_address}",
              cpus, len([n for n in ray.nodes() if n.get("Alive")]), limit,
              ", ".join(f"{k} {v:g}" for k, v in resources.items()),
              "" if reserve else "; the client actors hold every CPU")
    box = [ray.put(shared)]  # in a list: the task receives the reference and gets it once per worker process
    queue = [chains[i] for i in run_order(chains)]
    pending: dict[Any, Chain] = {}
    nodes: set[str] = set()
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                chain = queue.pop(0)
                pending[task.remote(box, chain)] = chain
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            chain = pending.pop(ref)
            try:
                outcomes, records, states, node = ray.get(ref)
            except Exception as err:  # ray.exceptions.RayError: retries exhausted, or the cell code raised
                raise RuntimeError(f"a Ray task failed while computing {chain.tasks[0].spec.name} "
                                   f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})") from err
            nodes.add(node)
            for record in records:
                logger = logging.getLogger(record.name)
                if logger.isEnabledFor(record.levelno):
                    logger.handle(record)
            for i, outcome in enumerate(outcomes):
                on_cell(_restore_checkpoint(outcome, chain, states[i]) if i in states else outcome)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    if nodes:
        _log.info("sweep: the Ray tasks ran on %d node%s (%s)", len(nodes), "s" * (len(nodes) != 1),
                  ", ".join(sorted(n[:8] for n in nodes)))
