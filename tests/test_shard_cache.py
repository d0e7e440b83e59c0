"""The clients' in-process shard cache: every shard of a large federation stays cached (no rebuild per
round), and the byte budget evicts the least recently used shard first."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edge_client.data as data
from common.datasets import get_meta
from common.scenario import scenario_from_dict

META = get_meta("fashion-mnist")


@pytest.fixture()
def fake_shards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    built: list[int] = []

    def build(scenario, partition_id: int, num_partitions: int) -> data.ClientShard:  # type: ignore[no-untyped-def]
        built.append(partition_id)
        n = 30  # 30 images of 1x28x28 uint8: 23.5 KB per shard
        return data.ClientShard(partition_id=partition_id, num_partitions=num_partitions, meta=META,
                                x=torch.zeros(n, 1, 28, 28, dtype=torch.uint8), y=torch.zeros(n, dtype=torch.int64),
                                indices=np.arange(n, dtype=np.int64), num_train=n)

    monkeypatch.setattr(data, "_build_shard", build)
    data.shard_cache_clear()
    yield built
    data.shard_cache_clear()


def _scenario(clients: int):  # type: ignore[no-untyped-def]
    return scenario_from_dict({"federation": {"num_clients": clients, "min_clients": 2}})


def test_hundreds_of_clients_are_built_once_each(fake_shards: list[int]) -> None:
    s = _scenario(256)
    for _round in range(3):
        for pid in range(256):
            assert data.load_client_shard(s, pid, 256).partition_id == pid
    assert sorted(fake_shards) == list(range(256))  # a count cap of 64 rebuilt every shard every round


def test_byte_budget_evicts_the_least_recently_used(fake_shards: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    one = 30 * 28 * 28 + 30 * 8 + 30 * 8
    monkeypatch.setattr(data, "_CACHE_BYTES", 3 * one)  # room for three shards
    s = _scenario(8)
    for pid in (0, 1, 2):
        data.load_client_shard(s, pid, 8)
    data.load_client_shard(s, 0, 8)  # 0 is now the most recently used
    data.load_client_shard(s, 3, 8)  # evicts 1, the least recently used
    assert fake_shards == [0, 1, 2, 3]
    data.load_client_shard(s, 0, 8)
    data.load_client_shard(s, 2, 8)
    assert fake_shards == [0, 1, 2, 3]  # still cached
    data.load_client_shard(s, 1, 8)
    assert fake_shards == [0, 1, 2, 3, 1]  # rebuilt: it was evicted
