"""Phase 2: collect the pooled safe set T' from the clients.

Goal: exactly ``pipc`` images per class, spread evenly over the clients. Protocol:

1. every client is asked for its even share of every class (``quota``);
2. a client short of a class sends what it has and reports the shortfall; it is then
   marked exhausted for that class;
3. the missing images of a class are asked, again spread evenly, from the clients not yet
   exhausted for it, with ``offset`` = what each already sent (clients answer statelessly
   from a fixed per-class order, so nothing is sent twice);
4. repeat until every class is full, or no client can give more (clear error).

After every request round each client's images so far are screened (copies of each other;
with the global model, labels it contradicts far more often than for the other clients): a
flagged client is dropped and named, its images leave the pool, its share goes to the others.

The planning loop takes a plain ``ask`` callback, so it is testable without Flower;
:func:`collect_safe_pool` plugs in the Grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging import INFO

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.records import CFG_SCENARIO, KEY_CLIENT, KEY_CONFIG, KEY_METRICS, KEY_SAFE, ImageSet, image_keys, record_bytes
from server.federation.validate import (QUERY_METRICS, FailureLog, ReplyRejected, ShardPlan, _check_declared, _count, _decoded,
                             check_client_record, check_metric_keys, check_record_names, check_safe_images)

__all__ = ["SafePool", "SafeReply", "CollectError", "empty_pool", "spread_evenly", "plan_collection", "collect_safe_pool",
           "pool_subset", "label_screen", "duplicate_screen", "combine_screens"]


class CollectError(RuntimeError):
    """The clients together cannot supply the requested safe pool, or one answered wrongly."""


@dataclass
class SafeReply:
    images: ImageSet
    shortfall: np.ndarray  # int64 per class
    partition_id: int
    num_bytes: int  # payload bytes of the reply (the upload)
    shard_bytes: int | None = None  # size of the client's private shard, for comparison


@dataclass
class SafePool:
    """The pooled safe set, class-major, each class in a fixed seeded order."""

    x: torch.Tensor  # uint8 N x C x H x W
    y: torch.Tensor  # int64
    keys: torch.Tensor  # int64 content key of each image (common.records.image_keys): the audit's "uploaded" set
    partition_ids: torch.Tensor  # int64 client that sent each image
    pipc: int
    uploads: list[dict] = field(default_factory=list)  # per reply: node, partition, images, bytes, request round

    def per_class(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.y.numpy(), minlength=num_classes)


def spread_evenly(total: int, num_clients: int, rotate: int = 0) -> list[int]:
    """Split ``total`` over clients; the remainder goes to clients ``rotate, rotate+1, ...``."""
    base, extra = divmod(int(total), num_clients)
    shares = [base] * num_clients
    for k in range(extra):
        shares[(rotate + k) % num_clients] += 1
    return shares


AskFn = Callable[[dict[int, tuple[list[int], list[int]]]], dict[int, SafeReply]]


ScreenFn = Callable[[dict[int, list[ImageSet]]], dict[int, str]]


def plan_collection(node_ids: Sequence[int], num_classes: int, pipc: int, ask: AskFn,
                    allow_short: bool = False, failures: FailureLog | None = None, min_clients: int = 1,
                    image_shape: Sequence[int] | None = None,
                    screen: ScreenFn | None = None) -> tuple[dict[int, list[ImageSet]], list[dict]]:
    """Run the request/rebalance loop; returns the image sets received per node and an upload log.

    ``node_ids`` order decides who gets the remainder of an uneven split: pass a stable order
    (by partition id) for a pool that is reproducible across runs (node ids are random).
    ``allow_short`` (pipc 'all'): a class that every client has exhausted counts as complete.
    ``failures``: a client that fails (error, no reply, malformed reply; see server/federation/validate.py)
    is logged there and dropped, its share rebalanced over the others, as long as at least
    ``min_clients`` remain; without it any failure raises :class:`CollectError`.
    ``screen``: after each request round, every client's images so far -> {node: reason} of the clients
    whose images are poisoned (:func:`label_screen`); those are dropped like a failed client, everything
    they sent leaves the pool and their share is asked from the others.
    """
    nodes = list(dict.fromkeys(node_ids))
    if not nodes:
        raise CollectError("no client is connected: cannot collect safe images")
    have = np.zeros((len(nodes), num_classes), dtype=np.int64)  # received per node, class
    exhausted = np.zeros((len(nodes), num_classes), dtype=bool)
    received: dict[int, list[ImageSet]] = {n: [] for n in nodes}
    failed: set[int] = set()
    uploads: list[dict] = []
    request_round = 0
    while True:
        deficit = pipc - have.sum(axis=0)
        if allow_short:  # pipc 'all': a class is done once every client has sent all it holds
            deficit[exhausted.all(axis=0)] = 0
        if (deficit <= 0).all():
            break
        quota = np.zeros_like(have)
        for c in np.flatnonzero(deficit > 0):
            able = np.flatnonzero(~exhausted[:, c])
            if able.size == 0:
                total = int(have[:, c].sum())
                raise CollectError(
                    f"the clients together hold only {total} shareable images of class {c}, but the pool "
                    f"needs {pipc} per class (max of distill.pipc); lower distill.pipc, add clients or data, "
                    "or raise the devices' own caps (node setting max-safe-per-class / FEDPDD_SAFE_CAP: each "
                    "device's release ledger counts the images of every earlier query and run)"
                )
            # rotate the remainder by class so no client always gets the extra image
            for k, share in zip(able, spread_evenly(int(deficit[c]), able.size, rotate=c + request_round)):
                quota[k, c] = share
        requests = {
            nodes[k]: (quota[k].tolist(), have[k].tolist()) for k in range(len(nodes)) if quota[k].sum() > 0
        }
        replies = ask(requests)
        request_round += 1
        for k, node in enumerate(nodes):
            if node not in requests:
                continue
            reply = replies.get(node)
            try:
                if reply is None:
                    raise ReplyRejected("no reply within federation.reply_timeout_s")
                if isinstance(reply, str):  # the ask callback's reason for an error / undecodable reply
                    raise ReplyRejected(reply)
                counts = check_safe_images(reply.images.x, reply.images.y, np.asarray(reply.shortfall),
                                           quota[k], num_classes, image_shape)
            except ReplyRejected as err:
                if failures is None:
                    raise CollectError(f"node {node} failed the safe-subset query: {err}") from err
                # drop the client: its quota is spread over the others in the next request round
                why = str(err) if reply is None or isinstance(reply, str) else f"malformed reply rejected: {err}"
                failures.add("query", node, why, request_round)
                exhausted[k] = True
                failed.add(node)
                if len(nodes) - len(failed) < min_clients:
                    raise CollectError(
                        f"only {len(nodes) - len(failed)} of {len(nodes)} clients answered the safe-subset query "
                        f"(federation.min_clients = {min_clients}); see failures.csv"
                    ) from err
                continue
            have[k] += counts
            exhausted[k] |= reply.shortfall > 0
            received[node].append(reply.images)
            uploads.append({"node_id": node, "partition_id": reply.partition_id, "request": request_round,
                            "images": int(counts.sum()), "bytes": reply.num_bytes,
                            "shard_bytes": reply.shard_bytes})
        if screen is not None:
            flagged = screen({n: sets for n, sets in received.items() if n not in failed and sets})
            for node, why in flagged.items():
                if failures is None:
                    raise CollectError(f"node {node} sent poisoned safe images: {why}")
                k = nodes.index(node)
                failures.add("query", node, f"safe images rejected: {why}", request_round)
                exhausted[k] = True
                failed.add(node)
                have[k] = 0  # nothing it sent stays in the pool: its share is asked from the others
                received[node] = []
            if len(nodes) - len(failed) < min_clients:
                raise CollectError(
                    f"only {len(nodes) - len(failed)} of {len(nodes)} clients sent usable safe images "
                    f"(federation.min_clients = {min_clients}); see failures.csv")
    return received, uploads


def label_screen(predict: Callable[[torch.Tensor], torch.Tensor], margin: float = 0.3,
                 min_images: int = 5) -> ScreenFn:
    """Flag clients whose safe images the global model assigns to another class far more often than the others'.

    ``predict(x uint8) -> labels``. A client is flagged when its disagreement rate exceeds the median rate
    of the other clients by ``margin`` (needs 3 clients and ``min_images`` images from it: with two
    clients neither is the odd one out; a weak model, which misreads everyone's images, flags nobody).
    Images a model misreads this much more often are mislabelled or not images of their class: poison,
    or a broken device.
    """
    cache: dict[int, tuple[int, int, int]] = {}  # node -> (images seen, disagreements, sets seen)

    def screen(received: dict[int, list[ImageSet]]) -> dict[int, str]:
        rates: dict[int, tuple[float, int]] = {}
        for node, sets in received.items():
            seen, wrong, done = cache.get(node, (0, 0, 0))
            for im in sets[done:]:  # only the new replies are predicted
                if im.y.numel():
                    wrong += int((predict(im.x) != im.y).sum())
                    seen += int(im.y.numel())
            cache[node] = (seen, wrong, len(sets))
            if seen:
                rates[node] = (wrong / seen, seen)
        flagged: dict[int, str] = {}
        log(INFO, "collect: share of each client's safe images the global model assigns to another class: %s",
            ", ".join(f"node {n} {r:.0%} of {k}" for n, (r, k) in sorted(rates.items())))
        if len(rates) < 3:
            return flagged
        for node, (rate, seen) in rates.items():
            others = float(np.median([r for n, (r, _) in rates.items() if n != node]))
            if seen >= min_images and rate >= others + margin:
                flagged[node] = (f"the global model assigns {rate:.0%} of its {seen} images to another class "
                                 f"than their label, the other clients' median is {others:.0%}")
        return flagged

    return screen


def duplicate_screen(max_fraction: float = 0.1) -> ScreenFn:
    """Flag clients whose safe images repeat: more than ``max_fraction`` (and more than one) are byte copies."""

    def screen(received: dict[int, list[ImageSet]]) -> dict[int, str]:
        flagged: dict[int, str] = {}
        for node, sets in received.items():
            x = torch.cat([im.x for im in sets]) if sets else None
            if x is None or x.shape[0] < 2:
                continue
            dup = int(x.shape[0] - torch.unique(image_keys(x)).numel())
            if dup > 1 and dup > max_fraction * x.shape[0]:
                flagged[node] = f"{dup} of its {x.shape[0]} images are copies of its other images"
        return flagged

    return screen


def combine_screens(*screens: ScreenFn | None) -> ScreenFn:
    """Run the screens in turn; a client flagged by any of them is flagged, with the first screen's reason."""

    def screen(received: dict[int, list[ImageSet]]) -> dict[int, str]:
        flagged: dict[int, str] = {}
        for s in screens:
            if s is not None:  # a client one screen flagged does not skew the next screen's comparison
                flagged.update(s({n: v for n, v in received.items() if n not in flagged}))
        return flagged

    return screen


def _order_pool(images: list[tuple[ImageSet, int]], num_classes: int, pipc: int, seed: int) -> SafePool:
    x = torch.cat([im.x for im, _ in images])
    y = torch.cat([im.y for im, _ in images])
    idx = image_keys(x)  # computed here from the pixels: no client sends where an image sits in its data
    pid = torch.cat([torch.full_like(im.y, p) for im, p in images])
    # Sort by (class, content key) first so the seeded shuffle does not depend on arrival order
    base = np.lexsort((idx.numpy(), y.numpy()))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC011]))
    order = np.concatenate([rng.permutation(base[y.numpy()[base] == c]) for c in range(num_classes)])
    o = torch.from_numpy(order.astype(np.int64))
    return SafePool(x=x[o], y=y[o], keys=idx[o], partition_ids=pid[o], pipc=pipc)


def pool_subset(pool_x: torch.Tensor, pool_y: torch.Tensor, pipc: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``pipc`` images of each class in pool order: smaller pools nest in larger ones.

    ``pipc`` -1 ('all') is the whole pool."""
    if pipc == -1:
        return pool_x, pool_y
    y = pool_y.numpy() if isinstance(pool_y, torch.Tensor) else np.asarray(pool_y)
    keep = np.concatenate([np.flatnonzero(y == c)[:pipc] for c in range(num_classes)]) if num_classes else np.zeros(0, int)
    short = [c for c in range(num_classes) if (y == c).sum() < pipc]
    if short:
        raise CollectError(f"the safe pool has fewer than pipc={pipc} images of classes {short}")
    keep_t = torch.from_numpy(np.sort(keep).astype(np.int64))
    return pool_x[keep_t], pool_y[keep_t]


def _decode(reply: Message, num_classes: int, quota: Sequence[int] | None = None,
            image_shape: Sequence[int] | None = None, plan: ShardPlan | None = None,
            expected_pid: int | None = None, claimed: dict[int, int] | None = None,
            offset: Sequence[int] | None = None) -> SafeReply:
    """Screen a safe reply, then decode it; every check runs before the images are decoded."""
    content = reply.content
    node = reply.metadata.src_node_id
    check_record_names(content, {KEY_SAFE}, {KEY_METRICS}, {KEY_CLIENT})
    metrics = check_metric_keys(content, QUERY_METRICS, optional=frozenset({"capped"}))
    pid = check_client_record(content, plan, expected_pid, claimed, node)
    raw = metrics["shortfall"]
    if not isinstance(raw, list) or len(raw) != num_classes:
        raise ReplyRejected(f"shortfall must list {num_classes} classes, got {str(raw)[:80]}")
    limits = list(quota) if quota is not None else [None] * num_classes
    # an inf / 1e308 shortfall would overflow int64: check each value as a bounded count first
    shortfall = np.array([_count(v, f"shortfall[{c}]", 0, limits[c]) for c, v in enumerate(raw)], dtype=np.int64)
    safe = content.array_records[KEY_SAFE]
    if set(safe.keys()) != {"x", "y"}:  # no training-set indices or anything else travels with the images
        raise ReplyRejected(f"safe images hold exactly the arrays x and y, got {sorted(safe.keys())}")
    n_declared = tuple(getattr(safe["y"], "shape", ()))
    n = n_declared[0] if len(n_declared) == 1 else -1
    asked = int(sum(quota)) if quota is not None else None
    if n < 0 or (asked is not None and n > asked):
        raise ReplyRejected(f"declares {n_declared} labels for {asked} asked images")
    shape = tuple(image_shape) if image_shape is not None else tuple(getattr(safe["x"], "shape", ()))[1:]
    _check_declared(safe["x"], "x", (n, *shape), "uint8")  # a 157 MB reply for 20 images stops here
    _check_declared(safe["y"], "y", (n,), "int64")
    x = torch.from_numpy(np.array(_decoded(safe["x"], "x", (n, *shape), "uint8"), copy=True))
    y = torch.from_numpy(np.array(_decoded(safe["y"], "y", (n,), "int64"), copy=True))
    _count(metrics["num-examples"], "'num-examples'", n, n)
    if "capped" in metrics:
        capped = metrics["capped"]
        if not isinstance(capped, list) or len(capped) != num_classes:
            raise ReplyRejected(f"'capped' must list {num_classes} classes, got {str(capped)[:80]}")
        for c, v in enumerate(capped):
            _count(v, f"capped[{c}]", 0, int(shortfall[c]))  # refused images are part of the shortfall
    if quota is not None:
        available = None
        if plan is not None and offset is not None:
            available = np.asarray(plan.class_counts[pid]) - np.asarray(offset, dtype=np.int64)
        check_safe_images(x, y, shortfall, quota, num_classes, image_shape, available)
    client = content.config_records[KEY_CLIENT]
    return SafeReply(images=ImageSet(x=x, y=y), shortfall=shortfall, partition_id=pid,
                     num_bytes=record_bytes(content), shard_bytes=int(client["shard-bytes"]))


def _grid_ask(grid: Grid, scenario_json: str, num_classes: int, timeout: float, soft: bool = False,
              image_shape: Sequence[int] | None = None, plan: ShardPlan | None = None,
              partition_of: dict[int, int] | None = None) -> AskFn:
    claimed: dict[int, int] = dict(partition_of or {})  # node -> partition id, grows as clients answer

    def ask(requests: dict[int, tuple[list[int], list[int]]]) -> dict[int, SafeReply]:
        messages = [
            Message(
                content=RecordDict({KEY_CONFIG: ConfigRecord({CFG_SCENARIO: scenario_json, "quota": quota, "offset": offset})}),
                dst_node_id=node,
                message_type=MessageType.QUERY,
            )
            for node, (quota, offset) in requests.items()
        ]
        replies: dict[int, SafeReply] = {}
        for reply in grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if node not in requests or node in replies:  # a reply nobody asked for is ignored
                continue
            if reply.has_error():
                if soft:
                    replies[node] = f"error reply: {reply.error.reason}"
                    continue
                raise CollectError(f"node {node} failed the safe-subset query: {reply.error.reason}")
            quota, offset = requests[node]
            try:
                replies[node] = _decode(reply, num_classes, quota, image_shape, plan, claimed.get(node), claimed,
                                        offset)
                claimed[node] = replies[node].partition_id
            except (ValueError, TypeError, KeyError, ReplyRejected) as err:
                if not soft:
                    raise CollectError(f"node {node} failed the safe-subset query: {err}") from err
                # reliability mode: a bad reply becomes a failure reason, not a crash
                replies[node] = f"malformed reply rejected: {err}"
        return replies

    return ask


def empty_pool(image_shape: tuple[int, int, int]) -> SafePool:
    """The pool of a run that needs no safe images (pipc 0: model-only methods)."""
    empty = torch.zeros(0, dtype=torch.int64)
    return SafePool(x=torch.zeros((0, *image_shape), dtype=torch.uint8), y=empty, keys=empty.clone(),
                    partition_ids=empty.clone(), pipc=0)


def collect_safe_pool(
    grid: Grid, node_ids: Sequence[int], scenario_json: str, num_classes: int, pipc: int, seed: int,
    image_shape: tuple[int, int, int], partition_of: dict[int, int] | None = None, timeout: float = 600.0,
    allow_short: bool = False, failures: FailureLog | None = None, min_clients: int = 1,
    plan: ShardPlan | None = None, predict: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SafePool:
    """Query the clients until the pool holds exactly ``pipc`` images per class.

    ``partition_of`` (node id -> partition id, known from the training replies) orders the
    clients so the same scenario collects the same pool in every run. ``allow_short`` (pipc
    'all', ``pipc`` = the largest class count): classes the clients hold fewer of are taken whole.
    Every client's images are screened for copies and, with ``predict`` (the global model, uint8
    images -> labels), for labels the model contradicts far more often than for the other clients.
    """
    if pipc == 0:
        return empty_pool(image_shape)
    start = time.perf_counter()
    known = partition_of or {}
    order = sorted(node_ids, key=lambda n: (known.get(n, len(known) + 1), n))
    ask = _grid_ask(grid, scenario_json, num_classes, timeout, soft=failures is not None, image_shape=image_shape,
                    plan=plan, partition_of=known)
    try:
        screen = combine_screens(duplicate_screen(), label_screen(predict) if predict is not None else None)
        received, uploads = plan_collection(order, num_classes, pipc, ask, allow_short=allow_short,
                                            failures=failures, min_clients=min_clients, image_shape=image_shape,
                                            screen=screen)
    finally:
        if failures is not None:
            failures.fill_partitions(known)  # name the partitions of clients that failed the query
    sender = {u["node_id"]: u["partition_id"] for u in uploads}
    images = [(im, sender[node]) for node, sets in received.items() for im in sets]
    if not images:
        raise CollectError("no safe images were collected")
    pool = _order_pool(images, num_classes, pipc, seed)
    pool.uploads = uploads
    log(INFO, "collect: %d safe images (%d per class) from %d clients in %d request rounds, %.1fs",
        len(pool.y), pipc, len(received), max((u["request"] for u in uploads), default=0), time.perf_counter() - start)
    return pool
