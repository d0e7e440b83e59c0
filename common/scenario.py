"""YAML scenario schema: defaults, validation, overrides, and the resolved copy saved with every run.

A scenario is a tree of dataclasses. Every field below is documented in `scenarios/README.md`;
the defaults here ARE the documented defaults. Validation runs before any work starts and
every error names the offending key (dotted path) and the file it came from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from common.dataset_meta import get_meta  # torch-free: server.check never loads torch
from common.grid import PIPC_ALL, normalize_pipc, static_skip_reason
from common.methods import METHODS, NO_MODEL_METHODS  # the method registry

APP_DIR = Path(__file__).resolve().parents[1]
DEFAULT_SCENARIO = "scenarios/quickstart.yaml"

DATASETS = ("cifar10", "fashion-mnist", "mnist", "cifar100", "svhn")
PARTITIONS = ("iid", "dirichlet", "shards")
SAFE_POLICIES = ("random", "first")
INITS = ("auto", "noise", "real")
OPTIMIZERS = ("sam", "sgd")
NORMS = ("instancenorm", "batchnorm", "layernorm", "none")
ACTIVATIONS = ("relu", "leakyrelu", "sigmoid")
POOLINGS = ("avgpooling", "maxpooling", "none")


MAX_ABS_INT = 2**53  # any integer setting beyond this is a typo (and would overflow int64 maths or JSON)
SEED_MAX = 2**32 - 1  # seeds: 0 .. 2**32-1 (torch.manual_seed, numpy's legacy RandomState and DataLoader agree)
# Upper bounds of run-length settings: far above any real run, low enough that a typo fails at once.
LIMITS = {"federation.rounds": 100_000, "federation.local_epochs": 100_000, "distill.iterations": 10_000_000,
          "evaluation.epochs": 1_000_000, "evaluation.num_models": 1_000, "model.width": 8192, "model.depth": 16,
          "federation.num_clients": 100_000, "distill.real_batch": 1_000_000, "federation.batch_size": 1_000_000,
          "evaluation.batch_size": 1_000_000, "privacy.dsv_iterations": 10_000_000, "privacy.local_epochs": 100_000,
          "privacy.audit_reference": 10_000_000, "federation.shards_per_client": 100_000,
          "federation.reply_timeout_s": 7 * 24 * 3600.0, "distill.workers": 1024}
MAX_IPC = 100_000  # per class; the memory estimate (check_resources) is the real limit


class ScenarioError(ValueError):
    """A scenario value is malformed; the message names the key and the file."""


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # cifar10 | fashion-mnist | mnist | cifar100 | svhn
    root: str | None = None  # local folder with the dataset files (searched first)
    download: bool = False  # allow a torchvision download when no local copy is found
    train_limit: int | None = None  # use only the first N training images (fast studies)
    test_limit: int | None = None  # use only the first N test images


@dataclass
class FederationConfig:
    num_clients: int | None = None  # None: as many clients as the federation has nodes
    partition: str = "iid"  # iid | dirichlet | shards
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    rounds: int = 2
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    min_clients: int = 1  # fewer answering clients than this stops the run
    reply_timeout_s: float = 600.0  # seconds the server waits for client replies per request
    client_eval: bool = False  # federated evaluation on each client's held-out part
    holdout_fraction: float = 0.1  # part of each shard held out for client evaluation
    augment: bool = False  # DSA during local training


@dataclass
class ModelConfig:
    width: int = 128
    depth: int = 3
    norm: str = "instancenorm"
    activation: str = "relu"
    pooling: str = "avgpooling"


@dataclass
class SafeConfig:
    policy: str = "random"  # random | first: how a client picks the images it may share


@dataclass
class DistillSection:
    methods: list[str] = field(default_factory=lambda: ["dm", "dkkt_dm", "random_real"])
    ipc: list[int] = field(default_factory=lambda: [1])
    pipc: list[int | str] = field(default_factory=lambda: [10])  # ints >= 0, or 'all' (= -1): every client image
    iterations: int = 1000
    lr_img: float = 1.0
    momentum_img: float = 0.5
    lr_lambda: float = 0.05  # Adam lr of log lambda (lambda_param log) or lambda (clamp)
    alpha: float | None = None  # None: appendix A rule by pipc (0.1 / 0.01 / 0.001)
    gamma: float | None = None  # None: appendix A rule by ipc (0.01 for ipc 50, else 0.001)
    init: str = "auto"  # auto (noise for ipc 1, real otherwise) | noise | real
    real_batch: int = 256
    dm_max_batch: int = 256  # most images per DM forward (classes never split; 0 = all in one forward)
    dsa: bool = True
    time_budget_s: float | None = None  # per distillation cell
    checkpoint_every: int = 0
    stat_distance: str = "cosine"  # D of L_stat: cosine | l1 | l2 (common/distill/dkkt.py: why cosine)
    stat_target: str = "update"  # what -sum lambda_i grad L_i must reach: update (theta* - theta_0) | theta (theta*)
    stat_relative: bool = False  # divide L_stat by D(target, 0) (l1 / l2 only; cosine is already relative)
    primal: str = "ce"  # ce (paper Eq. 3) | hinge (Deep Support Vectors Eq. 7)
    aug_weight: float = 5.0  # eta: weight of the DKKT terms on augmented images (manifold condition)
    lambda_init: float = 1.0  # initial Lagrange multipliers (> 0 with lambda_param log)
    lambda_param: str = "log"  # log (lambda = exp(rho), always > 0) | clamp (lambda, projected onto >= 0)
    lambda_autoscale: bool = False  # start lambda at the least-squares scale of the target (l1 / l2)
    img_optimizer: str = "adam"  # adam | sgd: one optimizer for every method | auto (SGD for dm, Adam for DKKT)
    lr_img_adam: float = 0.1  # image lr when the image optimizer is Adam
    seeds: list[int] | None = None  # distillation+evaluation seeds of the sweep; None: [seed]
    resume: bool = True  # reuse finished cells (and this folder's theta*/T') whose config matches
    workers: int = 0  # processes computing cells side by side: 0 = one per core on the CPU, 1 on a GPU (server/sweep/cell_pool.py)


@dataclass
class EvalSection:
    optimizer: str = "sam"  # sam (paper) | sgd (DM reference protocol)
    epochs: int = 300  # the paper uses 5000
    lr: float | None = None  # None: 0.1 for sam, 0.01 for sgd
    rho: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool = True
    num_models: int = 3
    width: int = 128  # evaluation ConvNet, the same for every method whatever theta*'s architecture
    depth: int = 3


FAULT_MODES = ("raise", "timeout", "drop_after_train", "malformed")
FAULT_PHASES = ("train", "evaluate", "query")


@dataclass
class FaultsConfig:
    """Injected client faults (reliability tests): the listed partitions fail in the listed phases."""

    clients: list[int] | None = None  # partition ids; None: no faults (a non-empty list otherwise)
    mode: str = "raise"  # raise | timeout | drop_after_train | malformed
    phases: list[str] = field(default_factory=lambda: ["train", "evaluate", "query"])
    seed: int = 0  # picks the malformation kind per (client, phase)


PRIVACY_MODES = ("model", "no_model_access")
DP_SIDES = ("server", "client")
DSV_COMBINE = ("average", "select")


@dataclass
class DPConfig:
    """Differentially private FedAvg with Flower's fixed-clipping wrappers (see server/federation/modes.py)."""

    enabled: bool = False
    side: str = "server"  # server (DifferentialPrivacyServerSideFixedClipping) | client (+ fixedclipping_mod)
    clipping_norm: float = 1.0  # L2 bound of each client's model update
    noise_multiplier: float = 0.1  # Gaussian noise stdev = noise_multiplier * clipping_norm / num_clients


@dataclass
class PrivacySection:
    mode: str = "model"  # model (FedAvg, clients upload weights) | no_model_access (clients upload DSVs)
    local_epochs: int | None = None  # no_model_access: local epochs before extraction (None: rounds x local_epochs)
    dsv_iterations: int = 100  # no_model_access: DKKT iterations of the client-side extraction
    dsv_combine: str = "average"  # no_model_access: N clients' DSVs -> ipc per class (average | select)
    audit: bool = True  # nearest-private-image audit of every synthetic set (privacy_audit.csv)
    audit_reference: int = 500  # held-out test images sampled for the audit's reference distribution
    dp: DPConfig = field(default_factory=DPConfig)


@dataclass
class Scenario:
    name: str = "scenario"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str | None = None  # None: runs/<name>; relative paths resolve against cwd
    reuse_artifacts: str | None = None  # run folder with global_model.pt + safe_pool.pt
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    safe: SafeConfig = field(default_factory=SafeConfig)
    distill: DistillSection = field(default_factory=DistillSection)
    evaluation: EvalSection = field(default_factory=EvalSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    source: str = field(default="<dict>", compare=False)  # file it was read from (not a key)

    @property
    def pool_pipc(self) -> int:
        """Safe images per class the server collects: the largest pipc of the grid (-1: 'all')."""
        return -1 if -1 in self.distill.pipc else max(self.distill.pipc)  # type: ignore[type-var]

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}").expanduser().resolve()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# ---------------------------------------------------------------- type-checked construction


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ScenarioError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            value = [value]  # a scalar where a grid is expected means a grid of one
        if not value:
            raise ScenarioError(f"{source}: key '{key}' must be a non-empty list")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ScenarioError(f"{source}: key '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key, source)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > MAX_ABS_INT:
            raise ScenarioError(f"{source}: key '{key}' is {value}, beyond any sensible setting (|x| <= 2**53)")
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        # NaN passes every `< 0` check and inf waits forever: no scenario number may be either
        raise ScenarioError(f"{source}: key '{key}' must be a finite number, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ScenarioError(f"{source}: key '{key}' must be true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ScenarioError(f"{source}: key '{key}' must be an integer, got {value!r}")
    if tp is int and abs(value) > MAX_ABS_INT:
        raise ScenarioError(f"{source}: key '{key}' is {value}, beyond any sensible setting (|x| <= 2**53)")
    if not isinstance(value, tp):
        raise ScenarioError(
            f"{source}: key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    return value


def _build(cls: type, values: dict[str, Any], prefix: str, source: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ScenarioError(
            f"{source}: unknown key '{where}{unknown[0]}'; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key, source)
    return cls(**kwargs)


def _check_choice(value: str, choices: tuple[str, ...], key: str, source: str) -> None:
    if value not in choices:
        raise ScenarioError(f"{source}: key '{key}' is {value!r}; choose one of {', '.join(choices)}")


def _check_positive(value: float | int | None, key: str, source: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ScenarioError(f"{source}: key '{key}' must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ScenarioError(f"{source}: key '{key}' must be {bound}, got {value!r}")


def _check_max(value: float | int | None, bound: float | int, key: str, source: str) -> None:
    if value is not None and value > bound:
        raise ScenarioError(f"{source}: key '{key}' is {value}, above the limit {bound}; is it a typo?")


def _check_seed(value: int, key: str, source: str) -> None:
    if not 0 <= value <= SEED_MAX:
        raise ScenarioError(f"{source}: key '{key}' must be in 0..{SEED_MAX} (2**32 - 1), got {value}")


def validate(s: Scenario) -> Scenario:
    """Reject impossible values and combinations before any work starts."""
    src = s.source
    _check_choice(s.data.dataset, DATASETS, "data.dataset", src)
    _check_choice(s.federation.partition, PARTITIONS, "federation.partition", src)
    _check_choice(s.safe.policy, SAFE_POLICIES, "safe.policy", src)
    _check_choice(s.distill.init, INITS, "distill.init", src)
    _check_choice(s.distill.stat_distance, ("l1", "l2", "cosine"), "distill.stat_distance", src)
    _check_choice(s.distill.img_optimizer, ("auto", "sgd", "adam"), "distill.img_optimizer", src)
    _check_choice(s.distill.stat_target, ("update", "theta"), "distill.stat_target", src)
    _check_choice(s.distill.primal, ("ce", "hinge"), "distill.primal", src)
    _check_choice(s.distill.lambda_param, ("log", "clamp"), "distill.lambda_param", src)
    _check_positive(s.evaluation.width, "evaluation.width", src)
    _check_positive(s.evaluation.depth, "evaluation.depth", src)
    _check_positive(s.distill.lr_img_adam, "distill.lr_img_adam", src)
    _check_positive(s.distill.aug_weight, "distill.aug_weight", src, allow_zero=True)
    _check_positive(s.distill.lambda_init, "distill.lambda_init", src, allow_zero=True)
    _check_choice(s.evaluation.optimizer, OPTIMIZERS, "evaluation.optimizer", src)
    _check_choice(s.model.norm, NORMS, "model.norm", src)
    _check_choice(s.model.activation, ACTIVATIONS, "model.activation", src)
    _check_choice(s.model.pooling, POOLINGS, "model.pooling", src)
    for i, method in enumerate(s.distill.methods):
        _check_choice(method, METHODS, f"distill.methods[{i}]", src)
    if len(set(s.distill.methods)) != len(s.distill.methods):
        raise ScenarioError(f"{src}: key 'distill.methods' lists a method twice: {s.distill.methods}")
    if not (s.device == "auto" or s.device == "cpu" or s.device.startswith("cuda")):
        raise ScenarioError(f"{src}: key 'device' is {s.device!r}; use auto, cpu, cuda or cuda:N")
    if not s.name or "/" in s.name:
        raise ScenarioError(f"{src}: key 'name' must be a non-empty name without '/', got {s.name!r}")
    for key, value in [
        ("data.train_limit", s.data.train_limit),
        ("data.test_limit", s.data.test_limit),
        ("federation.num_clients", s.federation.num_clients),
        ("federation.shards_per_client", s.federation.shards_per_client),
        ("federation.local_epochs", s.federation.local_epochs),
        ("federation.batch_size", s.federation.batch_size),
        ("federation.lr", s.federation.lr),
        ("federation.min_clients", s.federation.min_clients),
        ("federation.dirichlet_alpha", s.federation.dirichlet_alpha),
        ("model.width", s.model.width),
        ("model.depth", s.model.depth),
        ("distill.iterations", s.distill.iterations),
        ("distill.lr_img", s.distill.lr_img),
        ("distill.real_batch", s.distill.real_batch),
        ("distill.time_budget_s", s.distill.time_budget_s),
        ("evaluation.epochs", s.evaluation.epochs),
        ("evaluation.lr", s.evaluation.lr),
        ("evaluation.batch_size", s.evaluation.batch_size),
        ("evaluation.num_models", s.evaluation.num_models),
    ]:
        _check_positive(value, key, src)
    for key, value in [
        ("seed", s.seed),
        ("federation.rounds", s.federation.rounds),
        ("federation.momentum", s.federation.momentum),
        ("federation.weight_decay", s.federation.weight_decay),
        ("distill.momentum_img", s.distill.momentum_img),
        ("distill.lr_lambda", s.distill.lr_lambda),
        ("distill.alpha", s.distill.alpha),
        ("distill.gamma", s.distill.gamma),
        ("distill.checkpoint_every", s.distill.checkpoint_every),
        ("distill.dm_max_batch", s.distill.dm_max_batch),
        ("distill.workers", s.distill.workers),
        ("evaluation.rho", s.evaluation.rho),
        ("evaluation.momentum", s.evaluation.momentum),
        ("evaluation.weight_decay", s.evaluation.weight_decay),
    ]:
        _check_positive(value, key, src, allow_zero=True)
    for i, ipc in enumerate(s.distill.ipc):
        _check_positive(ipc, f"distill.ipc[{i}]", src)
        _check_max(ipc, MAX_IPC, f"distill.ipc[{i}]", src)
    _check_seed(s.seed, "seed", src)
    _check_seed(s.faults.seed, "faults.seed", src)
    for key, bound in LIMITS.items():
        section, name = key.split(".")
        _check_max(getattr(getattr(s, section), name), bound, key, src)
    if s.privacy.mode == "model" and s.federation.rounds < 1:
        raise ScenarioError(f"{src}: key 'federation.rounds' must be >= 1 (0 rounds would distill from an "
                            "untrained model), got 0")
    _validate_grid(s)
    if not 0.0 <= s.federation.holdout_fraction < 1.0:
        raise ScenarioError(
            f"{src}: key 'federation.holdout_fraction' must be in [0, 1), got {s.federation.holdout_fraction}"
        )
    if s.federation.num_clients is not None and s.federation.min_clients > s.federation.num_clients:
        raise ScenarioError(
            f"{src}: key 'federation.min_clients' ({s.federation.min_clients}) exceeds "
            f"federation.num_clients ({s.federation.num_clients})"
        )
    if s.data.train_limit is not None and s.federation.num_clients is not None:
        if s.federation.num_clients > s.data.train_limit:
            raise ScenarioError(
                f"{src}: key 'federation.num_clients' ({s.federation.num_clients}) exceeds "
                f"data.train_limit ({s.data.train_limit}): more clients than samples"
            )
    _validate_reliability(s)
    _validate_privacy(s)
    return s


def _validate_privacy(s: Scenario) -> None:
    """The privacy section: modes, client-side DSV budget, DP parameters (see server/federation/modes.py)."""
    src, p = s.source, s.privacy
    _check_choice(p.mode, PRIVACY_MODES, "privacy.mode", src)
    _check_choice(p.dsv_combine, DSV_COMBINE, "privacy.dsv_combine", src)
    _check_choice(p.dp.side, DP_SIDES, "privacy.dp.side", src)
    _check_positive(p.local_epochs, "privacy.local_epochs", src)
    _check_positive(p.dsv_iterations, "privacy.dsv_iterations", src)
    _check_positive(p.audit_reference, "privacy.audit_reference", src)
    _check_positive(p.dp.clipping_norm, "privacy.dp.clipping_norm", src)
    _check_positive(p.dp.noise_multiplier, "privacy.dp.noise_multiplier", src, allow_zero=True)
    if p.mode == "no_model_access":
        for i, method in enumerate(s.distill.methods):
            if method not in NO_MODEL_METHODS:
                raise ScenarioError(
                    f"{src}: key 'distill.methods[{i}]' is {method!r}, which needs the trained model; with "
                    f"privacy.mode 'no_model_access' the server has no model: use {', '.join(NO_MODEL_METHODS)}"
                )
        if p.dp.enabled:
            raise ScenarioError(f"{src}: key 'privacy.dp.enabled' is true but privacy.mode is 'no_model_access': "
                                "no FedAvg runs, so there is nothing to clip; disable dp or use mode 'model'")
        if s.reuse_artifacts:
            raise ScenarioError(f"{src}: key 'reuse_artifacts' is set but privacy.mode 'no_model_access' has no "
                                "global_model.pt to reuse; unset reuse_artifacts")


def _validate_grid(s: Scenario) -> None:
    """distill.pipc ('all' -> -1), distill.seeds, and that every method has a runnable cell.

    Single cells that cannot run (e.g. dm at pipc 0, random_real with ipc > pipc) are skipped
    with a recorded reason at run time (common.grid); a method with no runnable cell is an error.
    """
    src, d = s.source, s.distill
    for i, pipc in enumerate(d.pipc):
        try:
            d.pipc[i] = normalize_pipc(pipc)
        except ValueError as err:
            raise ScenarioError(f"{src}: key 'distill.pipc[{i}]': {err}") from None
    if len(set(d.pipc)) != len(d.pipc):
        raise ScenarioError(f"{src}: key 'distill.pipc' lists a value twice: {d.pipc}")
    if len(set(d.ipc)) != len(d.ipc):
        raise ScenarioError(f"{src}: key 'distill.ipc' lists a value twice: {d.ipc}")
    for i, seed in enumerate(d.seeds or []):
        _check_seed(seed, f"distill.seeds[{i}]", src)
    if d.seeds is not None and len(set(d.seeds)) != len(d.seeds):
        raise ScenarioError(f"{src}: key 'distill.seeds' lists a seed twice: {d.seeds}")
    for method in d.methods:
        reasons = [static_skip_reason(method, ipc, pipc, d.init) for ipc in d.ipc for pipc in d.pipc]
        if all(reasons):
            raise ScenarioError(
                f"{src}: key 'distill.pipc' / 'distill.ipc': no cell of method '{method}' can run: {reasons[0]}; "
                "add a larger pipc, a smaller ipc, or drop the method"
            )


def _validate_reliability(s: Scenario) -> None:
    """federation.reply_timeout_s and the faults section (see edge_client/faults.py)."""
    src, fl = s.source, s.faults
    _check_positive(s.federation.reply_timeout_s, "federation.reply_timeout_s", src)
    if not fl.clients:
        return
    _check_choice(fl.mode, FAULT_MODES, "faults.mode", src)
    for i, phase in enumerate(fl.phases):
        _check_choice(phase, FAULT_PHASES, f"faults.phases[{i}]", src)
    for i, pid in enumerate(fl.clients):
        n = s.federation.num_clients
        if pid < 0 or (n is not None and pid >= n):
            raise ScenarioError(
                f"{src}: key 'faults.clients[{i}]' is {pid}; partition ids run from 0 to "
                f"{'federation.num_clients - 1' if n is None else n - 1}"
            )


# ---------------------------------------------------------------- loading and overrides


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ScenarioError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def scenario_from_dict(values: dict[str, Any], source: str = "<dict>", overrides: dict[str, Any] | None = None) -> Scenario:
    """Build and validate a Scenario from a plain mapping, applying dotted-key overrides."""
    tree = json.loads(json.dumps(values))  # deep copy, plain types
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    scenario = _build(Scenario, tree, "", source)
    scenario.source = source
    return validate(scenario)


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases: a scenario never needs them, and nested aliases
    expand exponentially (an 'alias bomb': 7 levels took 9.7 s, x9 per level) before any key is checked."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML alias '*{event.anchor}' at {event.start_mark}: aliases and anchors are "
                                 "not allowed in a scenario; write the values out")
        return super().compose_node(parent, index)


MAX_SCENARIO_BYTES = 1 << 20  # a scenario is a few KiB; refuse to parse megabytes


def safe_yaml_load(text: str) -> Any:
    """``yaml.safe_load`` without aliases and with a size limit (scenario files, resolved copies)."""
    if len(text) > MAX_SCENARIO_BYTES:
        raise yaml.YAMLError(f"scenario text is {len(text)} bytes, more than {MAX_SCENARIO_BYTES}")
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def find_scenario_file(path: str | os.PathLike[str]) -> Path:
    """Resolve a scenario path: as given (absolute or relative to cwd), then relative to the app."""
    candidates = [Path(path).expanduser()]
    if not candidates[0].is_absolute():
        candidates.append(APP_DIR / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    tried = ", ".join(str(c.resolve()) for c in candidates)
    raise ScenarioError(f"scenario file {str(path)!r} not found (tried: {tried})")


def load_scenario(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Scenario:
    """Read, override and validate a scenario YAML file."""
    file = find_scenario_file(path)
    try:
        values = safe_yaml_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ScenarioError(f"{file}: malformed YAML: {err}") from err
    if not isinstance(values, dict):
        raise ScenarioError(f"{file}: the top level must be a mapping of keys, got {type(values).__name__}")
    return scenario_from_dict(values, source=str(file), overrides=overrides)


def save_resolved(scenario: Scenario, run_dir: str | os.PathLike[str]) -> Path:
    """Write the fully resolved scenario (defaults filled in) next to the run's results."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "scenario.resolved.yaml"
    tmp = target.with_suffix(".yaml.tmp")
    header = f"# resolved from {scenario.source}\n"
    tmp.write_text(header + yaml.safe_dump(scenario.to_dict(), sort_keys=False))
    os.replace(tmp, target)
    return target


# Short run-config keys (pyproject [tool.flwr.app.config]) -> scenario keys. Flower rejects
# run-config keys it does not declare, so every override key is declared there with "" = unset.
RUN_CONFIG_ALIASES: dict[str, str] = {
    "clients": "federation.num_clients",
    "rounds": "federation.rounds",
    "local-epochs": "federation.local_epochs",
    "partition": "federation.partition",
    "dirichlet-alpha": "federation.dirichlet_alpha",
    "methods": "distill.methods",
    "ipc": "distill.ipc",
    "pipc": "distill.pipc",
    "iterations": "distill.iterations",
    "eval-epochs": "evaluation.epochs",
    "num-models": "evaluation.num_models",
    "seed": "seed",
    "device": "device",
    "output-dir": "output_dir",
    "data-root": "data.root",
    "reuse-artifacts": "reuse_artifacts",
}


def _parse_override_value(raw: Any) -> Any:
    """Run-config values arrive as TOML scalars; strings are read as YAML ('1,10' is a list)."""
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if "," in text and not text.startswith("["):
        text = f"[{text}]"
    return safe_yaml_load(text)


def overrides_from_run_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """Collect scenario overrides from Flower's run-config: aliases plus `overrides` ('a.b=1;c=x')."""
    overrides: dict[str, Any] = {}
    for alias, dotted in RUN_CONFIG_ALIASES.items():
        raw = run_config.get(alias, "")
        if raw == "" or raw is None:
            continue
        overrides[dotted] = _parse_override_value(raw)
    free_form = str(run_config.get("overrides", "") or "")
    for item in filter(None, (part.strip() for part in free_form.split(";"))):
        if "=" not in item:
            raise ScenarioError(f"run-config 'overrides': item {item!r} is not key=value")
        key, raw = item.split("=", 1)
        overrides[key.strip()] = _parse_override_value(raw)
    return overrides


def resolve_from_run_config(run_config: dict[str, Any]) -> Scenario:
    """The scenario a Flower run asked for: run_config['scenario'] (else $FEDPDD_SCENARIO) + overrides."""
    path = str(run_config.get("scenario") or os.environ.get("FEDPDD_SCENARIO") or DEFAULT_SCENARIO)
    return load_scenario(path, overrides=overrides_from_run_config(run_config))


# ---------------------------------------------------------------- resources (before any work)

# CPU seconds per unit from bench/baseline_cpu.jsonl (width 128, 1 thread): one DM iteration at
# real_batch 256, one evaluation epoch of one model over <= 1 batch. Only for an order of magnitude.
_SEC_PER_DISTILL_ITER = 0.11
_SEC_PER_EVAL_EPOCH = 0.05
WARN_AFTER_S = 24 * 3600.0


def estimate_resources(s: Scenario) -> dict[str, float]:
    """Rough peak bytes of the server's phases and CPU seconds of the grid (see check_resources)."""
    meta = get_meta(s.data.dataset)
    k, img = meta.num_classes, meta.channels * meta.height * meta.width
    w, d = s.model.width, s.model.depth
    ipc = max(s.distill.ipc)
    # activations kept for backward per image: conv, norm, act, pool at full then 1/4, 1/16 ... resolution
    act = 4 * w * max(meta.height, 32) * max(meta.width, 32) * 4 * sum(0.25**i for i in range(d))
    params = 4 * (9 * w * (meta.channels + (d - 1) * w) + w * 16 * k)
    syn = 4 * k * ipc * img * 4  # the set, its gradient, two optimizer states
    distill = syn + (s.distill.real_batch + ipc) * act + 4 * params  # DM and DKKT go one class at a time
    evaluate = 2 * s.evaluation.batch_size * act + 5 * params + k * ipc * img * 4
    pool = 0 if s.pool_pipc == PIPC_ALL else k * max(s.pool_pipc, 0) * img
    cells = len(s.distill.methods) * len(s.distill.ipc) * len(s.distill.pipc) * len(s.distill.seeds or [0])
    scale = (w / 128) ** 2
    batches = -(-k * ipc // s.evaluation.batch_size)
    seconds = cells * (s.distill.iterations * _SEC_PER_DISTILL_ITER * scale * s.distill.real_batch / 256
                       + s.evaluation.num_models * s.evaluation.epochs * _SEC_PER_EVAL_EPOCH * scale * batches)
    return {"distill_bytes": distill, "evaluate_bytes": evaluate, "pool_bytes": pool,
            "peak_bytes": max(distill, evaluate) + pool, "cpu_seconds": seconds}


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_resources(s: Scenario, available: int | None = None) -> list[str]:
    """Refuse a scenario whose estimated peak memory exceeds what is available; warn on a long grid.

    Call before the run folder is created. ``available``: bytes (default: MemAvailable). Returns
    warnings (an estimated CPU time over a day); raises ScenarioError when the memory cannot fit.
    """
    est = estimate_resources(s)
    available = _available_bytes() if available is None else available
    if available is not None and est["peak_bytes"] > available:
        raise ScenarioError(
            f"{s.source}: the scenario needs about {est['peak_bytes'] / 2**30:.1f} GiB (synthetic set of "
            f"max(distill.ipc) = {max(s.distill.ipc)} per class, real batch distill.real_batch = "
            f"{s.distill.real_batch}, model.width = {s.model.width}, evaluation.batch_size = "
            f"{s.evaluation.batch_size}), but {available / 2**30:.1f} GiB are available; lower them")
    warnings = []
    if est["cpu_seconds"] > WARN_AFTER_S:
        warnings.append(
            f"{s.source}: distill.iterations x cells ({s.distill.iterations}) and evaluation.epochs x num_models "
            f"({s.evaluation.epochs} x {s.evaluation.num_models}) come to roughly {est['cpu_seconds'] / 3600:.0f} "
            "CPU hours (bench/baseline_cpu.jsonl rates; a GPU is much faster)")
    return warnings
