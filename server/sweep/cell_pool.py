"""Compute the sweep's cells, in this process or in a pool of worker processes.

A cell's result depends only on its inputs and its seed (every random draw comes from
generators seeded per cell), so cells can run in any order and in any process. On the CPU the
distillation of one cell keeps one core busy (one intra-op thread: a second thread buys ~1.0x
at these sizes, bench/threads.py), and the client actors are idle once the federation is
over, so ``distill.workers`` processes, one thread each, fill the cores.

- A *chain* is the unit of scheduling: one cell, or the cells of one (pipc, ipc, seed) that
  must run in order because a DSV-combining method (``uses_dsvs``) reuses that group's ``dsv``
  set. Chains start costliest first (DKKT methods, then DM, then the rest), which keeps the
  workers evenly busy.
- Workers are spawned (never forked: the server process runs Ray's and gRPC's threads), get
  the shared inputs once (theta*, the pools, the test split) and send their log lines back to
  this process, where they go to the same handlers as every other line.
- Everything that touches the run folder (records, manifest, artifacts) stays in the calling
  process (``on_cell``), so one writer owns the folder.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common import methods
from common.distill.synthesize import DistillConfig, DistillationError, SyntheticSet, synthesize
from common.evaluate import EvalConfig, EvalResult, evaluate_synthetic
from common.threads import cpu_cores, setup_process

__all__ = ["PoolInputs", "CellTask", "Chain", "CellOutcome", "SharedInputs", "cell_cost", "resolve_workers",
           "chain_tasks", "run_order", "run_chains"]

_LOGGER = "flwr"  # every fedpdd line goes to this logger (flwr.common.logger.log)


@dataclass
class PoolInputs:
    """One pipc's safe pool as synthesize takes it."""

    safe_x: torch.Tensor | None  # uint8 (with safe_normalize) or normalized float; None for pipc 0
    safe_y: torch.Tensor | None
    eff_pipc: int  # the real pool size per class ('all' -> the smallest class count)
    dcfg: DistillConfig  # this pipc's distillation config (alpha resolved for 'all')
    safe_normalize: Callable[[torch.Tensor], torch.Tensor] | None = None  # uint8 batch -> normalized (picklable)


@dataclass
class SharedInputs:
    """What every cell reads: sent once to each worker."""

    model: torch.nn.Module | None  # theta* (None: no_model_access)
    embed_factory: Callable[[torch.Generator], torch.nn.Module]
    model_factory: Callable[[int], torch.nn.Module]  # evaluation network for a seed
    ecfg: EvalConfig
    test_x: torch.Tensor  # normalized
    test_y: torch.Tensor
    num_classes: int
    image_shape: tuple[int, ...]
    device: torch.device
    pools: dict[int, PoolInputs]
    init_model: torch.nn.Module | None = None
    progress: bool = True


@dataclass
class CellTask:
    spec: Any  # server.sweep.cells.CellSpec
    checkpoint_path: Path
    client_dsv: tuple[torch.Tensor, torch.Tensor, str] | None = None  # no_model_access: (x, y, combine) for ipc


@dataclass
class Chain:
    """Cells that run in this order in one process; ``dsv`` seeds the group's DSV set (a resumed dsv cell)."""

    tasks: list[CellTask]
    dsv: SyntheticSet | None = None

    @property
    def cost(self) -> int:
        """Rough relative cost for scheduling: DKKT terms dominate, then DM, then evaluation alone."""
        return sum(cell_cost(t.spec.method) for t in self.tasks)


def cell_cost(method: str) -> int:
    """Rough relative cost of one cell of ``method`` (scheduling and the sweep's ETA)."""
    return 3 if methods.needs_model(method) else 2 if methods.optimizes(method) else 1


@dataclass
class CellOutcome:
    spec: Any
    syn: SyntheticSet | None = None
    result: EvalResult | None = None
    distill_s: float = 0.0
    eval_s: float = 0.0
    error: DistillationError | None = None
    info: dict = field(default_factory=dict)


def resolve_workers(requested: int, device: torch.device, chains: int) -> int:
    """``distill.workers``: 0 = one per core on the CPU and 1 on an accelerator; never more than chains."""
    n = requested if requested > 0 else (cpu_cores() if device.type == "cpu" else 1)
    return max(1, min(n, chains))


def chain_tasks(tasks: Sequence[CellTask], dsv_by_group: dict[tuple, SyntheticSet | None]) -> list[Chain]:
    """Group the cells to compute into chains (see the module docstring), in run order."""
    groups: dict[tuple, list[CellTask]] = {}
    for t in tasks:
        groups.setdefault((t.spec.pipc, t.spec.ipc, t.spec.seed), []).append(t)
    chains: list[Chain] = []
    for key, group in groups.items():
        linked = any(methods.uses_dsvs(t.spec.method) for t in group) and (
            any(t.spec.method == "dsv" for t in group) or dsv_by_group.get(key) is not None)
        if linked:
            chains.append(Chain(group, dsv_by_group.get(key)))
        else:
            chains.extend(Chain([t]) for t in group)
    return chains


def run_order(chains: Sequence[Chain]) -> list[int]:
    """Indices of ``chains``, costliest first (stable: run order among equals)."""
    return sorted(range(len(chains)), key=lambda i: -chains[i].cost)


def _compute_chain(shared: SharedInputs, chain: Chain) -> Iterator[CellOutcome]:
    """The chain's cells in order, each yielded as soon as it is done."""
    dsv_set = chain.dsv
    for task in chain.tasks:
        spec = task.spec
        pool = shared.pools[spec.pipc]
        global _CURRENT_CELL
        _CURRENT_CELL = spec.name
        logging.getLogger(_LOGGER).info("cell %s: distill + evaluate ...", spec.name)
        t0 = time.perf_counter()
        if task.client_dsv is not None:  # the clients' uploaded DSVs, combined to ipc per class
            x, y, combine = task.client_dsv
            dsv_set = SyntheticSet(x=x, y=y, method="dsv", ipc=spec.ipc,
                                   info={"source": "client uploads", "combine": combine})
        takes_dsvs = methods.uses_dsvs(spec.method) and dsv_set is not None
        try:
            syn = dsv_set if (spec.method == "dsv" and task.client_dsv is not None) else synthesize(
                spec.method, ipc=spec.ipc, num_classes=shared.num_classes, image_shape=shared.image_shape,
                pipc=pool.eff_pipc, safe_x=pool.safe_x, safe_y=pool.safe_y, safe_normalize=pool.safe_normalize,
                model=shared.model,
                embed_factory=shared.embed_factory, config=pool.dcfg.for_method(spec.method), seed=spec.seed,
                device=shared.device,
                progress=shared.progress, checkpoint_path=task.checkpoint_path,
                dsv_x=dsv_set.x if takes_dsvs else None, dsv_y=dsv_set.y if takes_dsvs else None,
                init_model=shared.init_model,
            )
        except DistillationError as err:  # NaN/Inf in this cell: the caller records it and goes on
            yield CellOutcome(spec, error=err)
            continue
        if spec.method == "dsv":
            dsv_set = syn
        t1 = time.perf_counter()
        res = evaluate_synthetic(syn.x, syn.y, shared.test_x, shared.test_y, shared.model_factory, shared.ecfg,
                                 seed=spec.seed, device=shared.device, progress=shared.progress)
        yield CellOutcome(spec, syn=syn, result=res, distill_s=t1 - t0, eval_s=time.perf_counter() - t1)


# ---------------------------------------------------------------- worker processes

_SHARED: SharedInputs | None = None  # set once per worker process by _init_worker
_CURRENT_CELL = ""  # the cell this process computes now: tags a worker's progress lines


class _CellTag(logging.Filter):
    """Prefix a worker's lines with its cell: two workers' progress lines interleave in one log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _CURRENT_CELL and not message.startswith("cell "):
            record.msg, record.args = f"[{_CURRENT_CELL}] {message}", None
        return True


class _Relay:
    """QueueListener target: a worker's log record goes to this process's logger of the same name."""

    def handle(self, record: logging.LogRecord) -> None:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


def _init_worker(shared: SharedInputs, log_queue: Any) -> None:
    global _SHARED
    setup_process("worker")  # an entry point's runtime setup (common/threads.py): one thread, one core per worker
    logger = logging.getLogger(_LOGGER)
    handler = logging.handlers.QueueHandler(log_queue)
    handler.addFilter(_CellTag())
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    _SHARED = shared


def _run_in_worker(chain: Chain) -> list[CellOutcome]:
    assert _SHARED is not None, "worker not initialised"
    return list(_compute_chain(_SHARED, chain))


def run_chains(shared: SharedInputs, chains: Sequence[Chain], workers: int,
               on_cell: Callable[[CellOutcome], None]) -> None:
    """Compute every chain; ``on_cell`` runs in this process for each finished cell.

    With one worker everything runs here and ``on_cell`` follows each cell at once; with more,
    each chain's cells arrive when the chain finishes. A worker that dies (out of memory, killed)
    raises here with the chain's first cell named; cells already handed to ``on_cell`` are kept.
    """
    if workers <= 1:
        for chain in chains:
            for outcome in _compute_chain(shared, chain):
                on_cell(outcome)
        return
    order = run_order(chains)
    ctx = multiprocessing.get_context("spawn")
    log_queue = ctx.Queue()
    listener = logging.handlers.QueueListener(log_queue, _Relay())
    listener.start()
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(shared, log_queue)) as pool:
            futures = {pool.submit(_run_in_worker, chains[i]): chains[i] for i in order}
            for fut in as_completed(futures):
                try:
                    outcomes = fut.result()
                except Exception as err:
                    pool.shutdown(wait=False, cancel_futures=True)
                    first = futures[fut].tasks[0].spec.name
                    raise RuntimeError(f"a cell worker failed while computing {first} "
                                       f"({type(err).__name__}: {err})") from err
                for outcome in outcomes:
                    on_cell(outcome)
    finally:
        listener.stop()
