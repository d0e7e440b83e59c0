"""A client's private shard: which training images this simulated edge device holds.

The shard is ``partition_indices(train labels, num_partitions, scheme, seed)[partition_id]``
over the training set *as the federation sees it* (after ``data.train_limit``, a seeded
class-balanced subset, see :func:`federation_train_set`). Indices are positions in that
set ("global indices"). A ``holdout_fraction`` of the shard is held out, by a seeded
permutation, for the client's evaluation of the global model.

Shards are cached per process: a simulation actor serves many messages (and possibly
several partitions), and re-reading the dataset for every message would dominate the run.
Only the shard tensors are kept, never the rest of the training set.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from common.datasets import DatasetMeta, federation_train_set
from common.partition import partition_indices
from common.scenario import Scenario

__all__ = ["ClientShard", "load_client_shard", "shard_cache_clear"]


@dataclass(frozen=True)
class ClientShard:
    partition_id: int
    num_partitions: int
    meta: DatasetMeta
    x: torch.Tensor  # uint8, the whole shard (training part first, then held-out part)
    y: torch.Tensor  # int64
    indices: np.ndarray  # int64 global indices of x, same order
    num_train: int  # x[:num_train] trains, x[num_train:] is held out

    @property
    def train_x(self) -> torch.Tensor:
        return self.x[: self.num_train]

    @property
    def train_y(self) -> torch.Tensor:
        return self.y[: self.num_train]

    @property
    def holdout_x(self) -> torch.Tensor:
        return self.x[self.num_train :]

    @property
    def holdout_y(self) -> torch.Tensor:
        return self.y[self.num_train :]

    @property
    def nbytes(self) -> int:
        """Size of the private images in bytes (what sharing everything would cost)."""
        return int(self.x.numel() * self.x.element_size())


def _holdout_seed(seed: int, partition_id: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(partition_id), 0x401D]).generate_state(1)[0])


def _build_shard(scenario: Scenario, partition_id: int, num_partitions: int) -> ClientShard:
    splits = federation_train_set(scenario)
    f = scenario.federation
    parts = partition_indices(
        splits.train_y,
        num_partitions,
        scheme=f.partition,
        seed=scenario.seed,
        alpha=f.dirichlet_alpha,
        shards_per_client=f.shards_per_client,
    )
    own = np.asarray(parts[partition_id], dtype=np.int64)
    if own.size == 0:
        raise ValueError(
            f"client {partition_id}: its {f.partition} shard is empty "
            f"({len(splits.train_y)} training images over {num_partitions} clients); "
            "use fewer clients, a larger data.train_limit or a larger dirichlet_alpha"
        )
    # Seeded split of the shard: the first part trains, the rest is held out
    perm = np.random.default_rng(_holdout_seed(scenario.seed, partition_id)).permutation(own.size)
    num_hold = int(np.floor(f.holdout_fraction * own.size))
    num_hold = min(num_hold, own.size - 1)  # keep at least one training image
    order = own[np.concatenate([perm[num_hold:], perm[:num_hold]])]
    idx = torch.from_numpy(order)
    return ClientShard(
        partition_id=partition_id,
        num_partitions=num_partitions,
        meta=splits.meta,
        x=splits.train_x[idx].clone(),  # clone: drop the reference to the full training set
        y=splits.train_y[idx].clone(),
        indices=order,
        num_train=own.size - num_hold,
    )


_CACHE: dict[str, ClientShard] = {}  # least recently used first
_LOCK = threading.Lock()
# A byte budget, not a shard count: all shards of one federation together are one training set
# (Fashion-MNIST 47 MB, CIFAR-10 154 MB), so an actor serving hundreds of clients keeps every shard.
# A count cap of 64 made each actor rebuild shards every round beyond 64 clients (bench/clients_scaling.md:
# 60-100 s of the 256-client run).
_CACHE_BYTES = 512 * 2**20


def _nbytes(shard: ClientShard) -> int:
    return shard.x.nbytes + shard.y.nbytes + shard.indices.nbytes


def _cache_key(scenario: Scenario, partition_id: int, num_partitions: int) -> str:
    # everything that decides the shard's content, nothing else (lr etc. must not evict it)
    d, f = scenario.data, scenario.federation
    return repr(
        (d.dataset, d.root, d.train_limit, d.test_limit, scenario.seed, f.partition, f.dirichlet_alpha,
         f.shards_per_client, f.holdout_fraction, partition_id, num_partitions)
    )


def load_client_shard(scenario: Scenario, partition_id: int, num_partitions: int) -> ClientShard:
    """The shard of ``partition_id`` out of ``num_partitions`` (cached in-process)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    expected = scenario.federation.num_clients
    if expected is not None and expected != num_partitions:
        raise ValueError(
            f"the scenario asks for federation.num_clients={expected} but this federation has "
            f"{num_partitions} nodes (num-partitions); make them agree (e.g. options.num-supernodes)"
        )
    key = _cache_key(scenario, partition_id, num_partitions)
    with _LOCK:  # one load per shard even if an actor runs messages concurrently
        shard = _CACHE.pop(key, None)
        if shard is None:
            shard = _build_shard(scenario, partition_id, num_partitions)
        _CACHE[key] = shard  # now the most recently used
        while len(_CACHE) > 1 and sum(_nbytes(v) for v in _CACHE.values()) > _CACHE_BYTES:
            _CACHE.pop(next(iter(_CACHE)))  # evict the least recently used
    return shard


def shard_cache_clear() -> None:
    with _LOCK:
        _CACHE.clear()
