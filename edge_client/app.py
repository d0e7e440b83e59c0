"""Flower ClientApp: one simulated edge device holding a private shard.

Every message from the server carries the resolved scenario as JSON
(``config["scenario-json"]``), so a client needs no file of its own. Handlers:

* ``train``    local SGD of the global ConvNet -> weights + num-examples, train loss;
* ``evaluate`` accuracy / loss of the global model on the shard's held-out part;
* ``query``    the safe subset: uint8 images + int64 labels under the per-class quota in
  the request, in the device's own order, never more distinct images per class than the
  device's cap across all queries and runs (edge_client/policy.py: its release ledger), and the
  per-class shortfall (images the shard lacks or the cap refused; ``capped`` says how many).
  No training-set index is sent: the server identifies images by their content;
* ``query.dsv`` no-model-access mode: DSVs of a locally trained model, at most the device's
  ``max-dsv-per-class``.

The data location, the cap, the release order and seed are the node's settings
(edge_client/policy.py), never the scenario's.

Nothing else of the private data ever leaves the client.
"""

from __future__ import annotations

import os

# Before torch loads: libgomp's default busy-waiting makes torch 5-25x slower when the CPU is
# oversubscribed (server + simulated clients + anything else on a few cores). Override by exporting it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import functools
import json
import time
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from common.device import pick_device
from common.models import build_model
from common.records import (
    CFG_SCENARIO,
    DSV_ACTION,
    KEY_ARRAYS,
    KEY_CLIENT,
    KEY_CONFIG,
    KEY_DSV,
    KEY_METRICS,
    KEY_SAFE,
    dsvs_to_record,
    image_keys,
    images_to_record,
    record_to_state_dict,
    state_dict_to_record,
)
from common.scenario import Scenario, scenario_from_dict
from common.threads import setup_process
from edge_client.data import ClientShard, load_client_shard
from edge_client.dsv import dp_clipping_mod, dsv_seed, extract_dsvs, local_epochs
from edge_client.faults import before_handler, corrupt_reply
from edge_client.policy import ReleaseLedger, node_data, node_policy
from edge_client.safe import class_orders, safe_seed, select_safe
from edge_client.train import evaluate_local, train_local

__all__ = ["app"]

app = ClientApp()


@functools.lru_cache(maxsize=8)
def _scenario_from_json(text: str) -> Scenario:
    # cached: the same JSON arrives with every message of a run
    return scenario_from_dict(json.loads(text), source="<scenario-json from the server>")


def _config(msg: Message) -> ConfigRecord:
    if KEY_CONFIG not in msg.content.config_records:
        raise ValueError(f"message has no ConfigRecord {KEY_CONFIG!r}; is the ServerApp a fedpdd server?")
    return msg.content.config_records[KEY_CONFIG]


def _setup(msg: Message, context: Context) -> tuple[Scenario, ClientShard, ConfigRecord]:
    setup_process("client")  # every handler enters here: 1 thread per actor (common/threads.py)
    cfg = _config(msg)
    if CFG_SCENARIO not in cfg:
        raise ValueError(f"message config lacks {CFG_SCENARIO!r} (the resolved scenario)")
    scenario = _scenario_from_json(str(cfg[CFG_SCENARIO]))
    try:
        pid = int(context.node_config["partition-id"])
        num = int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node_config lacks {err}; start each SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        ) from err
    # where the device's data lives and whether it may download is the device's business, not the server's
    root, download = node_data(context.node_config)
    scenario = dataclasses.replace(scenario, data=dataclasses.replace(scenario.data, root=root, download=download))
    return scenario, load_client_shard(scenario, pid, num), cfg


def _client_record(shard: ClientShard) -> ConfigRecord:
    return ConfigRecord({"partition-id": shard.partition_id, "shard-size": int(shard.x.shape[0]),
                         "shard-bytes": shard.nbytes})


def _global_model(msg: Message, scenario: Scenario, shard: ClientShard) -> torch.nn.Module:
    if KEY_ARRAYS not in msg.content.array_records:
        raise ValueError(f"message has no ArrayRecord {KEY_ARRAYS!r} with the global model")
    model = build_model(shard.meta, dataclasses.asdict(scenario.model))
    model.load_state_dict(record_to_state_dict(msg.content.array_records[KEY_ARRAYS]))
    return model


@functools.lru_cache(maxsize=4)
def _client_device(spec: str) -> torch.device:
    """The scenario's device, except that a client without a visible GPU trains on the CPU.

    Simulated clients often get no GPU (client-resources num-gpus = 0) while the server has
    one; failing the whole run for that would be unhelpful. "cpu" is always honoured.
    """
    try:
        return pick_device(spec)
    except ValueError as err:
        if spec.strip().lower().startswith("cuda"):
            log(WARNING, "client: %s; training on the CPU instead", err)
            return torch.device("cpu")
        raise


def _round_seed(scenario: Scenario, partition_id: int, server_round: int) -> int:
    return int(np.random.SeedSequence([scenario.seed, partition_id, server_round, 0x7EA1]).generate_state(1)[0])


@app.train(mods=[dp_clipping_mod])  # client-side DP clipping when the server's DP wrapper asks
def train(msg: Message, context: Context) -> Message:
    scenario, shard, cfg = _setup(msg, context)
    f = scenario.federation
    server_round = int(cfg.get("server-round", 0))
    before_handler(scenario, shard.partition_id, "train")  # injected faults (scenario.faults)
    model = _global_model(msg, scenario, shard)
    stats = train_local(
        model,
        shard.train_x,
        shard.train_y,
        shard.meta,
        epochs=int(cfg.get("local-epochs", f.local_epochs)),
        batch_size=f.batch_size,
        lr=float(cfg.get("lr", f.lr)),
        momentum=f.momentum,
        weight_decay=f.weight_decay,
        augment=f.augment,
        device=_client_device(scenario.device),
        seed=_round_seed(scenario, shard.partition_id, server_round),
        label=f"client {shard.partition_id} round {server_round}",
    )
    log(INFO, "client %d round %d: %d images, loss %.4f, acc %.3f, %.1fs", shard.partition_id, server_round,
        stats.num_examples, stats.loss, stats.accuracy, stats.seconds)
    content = RecordDict({
        KEY_ARRAYS: state_dict_to_record(model.state_dict()),
        KEY_METRICS: MetricRecord({"num-examples": stats.num_examples, "train-loss": stats.loss,
                                   "train-acc": stats.accuracy}),
        KEY_CLIENT: _client_record(shard),
    })
    content, _ = corrupt_reply(scenario, shard.partition_id, "train", content, salt=server_round)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    scenario, shard, _ = _setup(msg, context)
    before_handler(scenario, shard.partition_id, "evaluate")
    model = _global_model(msg, scenario, shard)
    acc, loss = evaluate_local(model, shard.holdout_x, shard.holdout_y, shard.meta, _client_device(scenario.device))
    content = RecordDict({
        KEY_METRICS: MetricRecord({"num-examples": int(shard.holdout_y.shape[0]), "eval-loss": loss,
                                   "eval-acc": acc}),
        KEY_CLIENT: _client_record(shard),
    })
    content, _ = corrupt_reply(scenario, shard.partition_id, "evaluate", content)
    return Message(content=content, reply_to=msg)


def safe_cap(context: Context) -> int:
    """The most distinct safe images per class this device ever releases (-1: no cap).

    The node's own setting (edge_client/policy.py: ``--node-config 'max-safe-per-class=N'``, else
    ``FEDPDD_SAFE_CAP``, else 50); neither the run config nor the server's scenario can raise it.
    """
    return node_policy(context.node_config).safe_cap


def _counts(raw: object, name: str, num_classes: int) -> list[int]:
    """A per-class request list, checked before it sizes anything."""
    if not isinstance(raw, list) or len(raw) != num_classes:
        raise ValueError(f"safe request: {name} must list {num_classes} counts, got {str(raw)[:80]}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in raw):
        raise ValueError(f"safe request: {name} must hold integers >= 0, got {str(raw)[:80]}")
    return [int(v) for v in raw]


@app.query()
def query(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    scenario, shard, cfg = _setup(msg, context)
    before_handler(scenario, shard.partition_id, "query")
    num_classes = shard.meta.num_classes
    quota = _counts(cfg.get("quota", []), "quota", num_classes)
    offset = _counts(cfg.get("offset", [0] * num_classes), "offset", num_classes)
    # The device's own policy, whatever the server asks: its cap, its order, its seed (edge_client/policy.py)
    policy = node_policy(context.node_config)
    cap = policy.safe_cap
    allowed = quota if cap < 0 else [max(0, min(q, cap - o)) for q, o in zip(quota, offset)]
    orders = class_orders(shard.y.numpy(), shard.indices, num_classes, policy.safe_policy,
                          safe_seed(policy.safe_seed, shard.partition_id))
    sel = select_safe(orders, allowed, offset)
    pos = torch.from_numpy(sel.positions)
    # the ledger: across queries and runs, never more than `cap` distinct images per class leave the device
    name = f"released-{shard.meta.name}-p{shard.partition_id}of{shard.num_partitions}.json"
    ledger = ReleaseLedger(policy.state_dir / name)
    keys = image_keys(shard.x[pos]).tolist() if pos.numel() else []
    ok = torch.from_numpy(ledger.release(keys, shard.y[pos].tolist(), cap))
    refused = torch.bincount(shard.y[pos][~ok], minlength=num_classes).tolist()
    pos = pos[ok]
    capped = [q - a + r for q, a, r in zip(quota, allowed, refused)]
    if any(capped):
        log(WARNING, "client %d: the server asked for %s safe images per class beyond offsets %s; its policy "
            "releases %d distinct images per class in all, so %s are refused", shard.partition_id, quota, offset,
            cap, capped)
    # pixels and labels only: no training-set index leaves the device (the server keys images by content)
    images = images_to_record(shard.x[pos], shard.y[pos])
    shortfall = [int(s) + c for s, c in zip(sel.shortfall, capped)]  # refused images count as not available
    log(INFO, "client %d: safe subset of %d images (asked %d, short %d) in %.2fs", shard.partition_id,
        int(pos.numel()), int(sum(quota)), int(sum(shortfall)), time.perf_counter() - start)
    content = RecordDict({
        KEY_SAFE: images,
        KEY_METRICS: MetricRecord({"num-examples": int(pos.numel()), "shortfall": shortfall, "capped": capped}),
        KEY_CLIENT: _client_record(shard),
    })
    content, _ = corrupt_reply(scenario, shard.partition_id, "query", content)
    return Message(content=content, reply_to=msg)


@app.query(DSV_ACTION)
def query_dsv(msg: Message, context: Context) -> Message:
    """No-model-access mode: train on the shard alone, extract DSVs, upload them (never the weights)."""
    scenario, shard, cfg = _setup(msg, context)
    ipc = cfg.get("ipc")
    cap = node_policy(context.node_config).dsv_cap
    if isinstance(ipc, bool) or not isinstance(ipc, int) or not 1 <= ipc <= cap:
        # the device decides how much it extracts: a server-chosen 10**7 never sizes an allocation here
        raise ValueError(f"the server asks for {str(ipc)[:40]} DSVs per class; this device extracts 1 to {cap} "
                         "(node setting max-dsv-per-class)")
    device = _client_device(scenario.device)
    seed = dsv_seed(scenario.seed, shard.partition_id)
    model = build_model(shard.meta, dataclasses.asdict(scenario.model), seed=scenario.seed)
    f = scenario.federation
    stats = train_local(model, shard.train_x, shard.train_y, shard.meta, epochs=local_epochs(scenario),
                        batch_size=f.batch_size, lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay,
                        augment=f.augment, device=device, seed=seed, label=f"client {shard.partition_id} local")
    x, y, info = extract_dsvs(model.eval(), shard.meta, scenario, ipc, seed, device)
    log(INFO, "client %d: local model (loss %.4f, acc %.3f, %.1fs), %d DSVs in %.1fs", shard.partition_id,
        stats.loss, stats.accuracy, stats.seconds, int(y.numel()), float(info.get("wall_s") or 0.0))
    content = RecordDict({
        KEY_DSV: dsvs_to_record(x, y),
        KEY_METRICS: MetricRecord({"num-examples": stats.num_examples, "train-loss": stats.loss,
                                   "train-acc": stats.accuracy, "dsv-seconds": float(info.get("wall_s") or 0.0)}),
        KEY_CLIENT: _client_record(shard),
    })
    return Message(content=content, reply_to=msg)
