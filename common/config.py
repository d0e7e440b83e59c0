"""One config model: the engine's settings ARE the scenario's sections.

Every setting is a dataclass field made with :func:`knob`, which carries its default, its help
text and its checks (choices, bounds, typo limits). From these fields alone:

- ``build`` turns a YAML mapping into the dataclass tree (scalars where a list is expected
  become a list of one; ints are accepted for floats; NaN/inf and bools-for-ints are refused);
- ``check_tree`` checks every value against its field's rules;
- ``add_arguments`` / ``from_arguments`` give ``python -m server.distill`` its flags;
- ``scenarios/schema_doc.py`` writes the key reference of scenarios/README.md.

Every error names the dotted key (``distill.iterations``), the value and where it came from: the
scenario file, ``--run-config`` (server/check.py re-labels it) or, for a config built in Python,
the class (``DistillConfig.lr_img``). ``DistillConfig`` and ``EvalConfig`` are what
``common.distill.synthesize`` and ``common.evaluate`` take, and ``Scenario.distill`` /
``Scenario.evaluation`` are instances of them: no copy between a section and the engine.

Plain data: no torch, no Flower (``python -m server.check`` stays fast).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Any, Union, get_args, get_origin, get_type_hints

from common.methods import METHODS

__all__ = ["ConfigError", "did_you_mean", "knob", "build", "check_tree", "fail", "engine_fields", "add_arguments", "from_arguments",
           "DistillConfig", "EvalConfig", "default_alpha", "default_gamma", "default_init", "parse_strategy",
           "DSA_OPS", "DSA_STRATEGY", "DEVICE_PROFILE", "profile_value", "EXECUTORS", "INITS", "OPTIMIZERS", "STAT_DISTANCES", "PRIMAL_MODES",
           "AUG_PASSES", "STAT_AT", "STAT_VARIANTS", "PAPER_VARIANT", "MAX_ABS_INT", "SEED_MAX", "MAX_IPC"]

MAX_ABS_INT = 2**53  # any integer setting beyond this is a typo (and would overflow int64 maths or JSON)
SEED_MAX = 2**32 - 1  # seeds: 0 .. 2**32-1 (torch.manual_seed, numpy's legacy RandomState and DataLoader agree)
MAX_IPC = 100_000  # per class; the memory estimate (common.scenario.check_resources) is the real limit

INITS: tuple[str, ...] = ("auto", "noise", "real")
# The distill settings a comparison may tune per method (distill.method_settings): the image optimizer and
# its step sizes. Budgets, loss weights and starts stay the same for every method of a grid.
METHOD_SETTINGS: tuple[str, ...] = ("img_optimizer", "lr_img", "lr_img_adam", "momentum_img", "lr_lambda")
OPTIMIZERS: tuple[str, ...] = ("sam", "sgd")
STAT_DISTANCES: tuple[str, ...] = ("l1", "l2", "cosine")  # common/distill/dkkt.py implements them
PRIMAL_MODES: tuple[str, ...] = ("ce", "hinge")  # common/distill/dkkt.py implements them
AUG_PASSES: tuple[str, ...] = ("both", "sample")  # common/distill/synthesize.py + dkkt.py implement them
STAT_AT: tuple[str, ...] = ("theta_star", "theta0", "path")  # common/distill/dkkt.py implements them
# distill.stat_variant: "project" = the keys as set; "paper" = Eq. 3-4 literally, i.e. these values of the keys
# (target theta*, the mean l1 distance, gradients at theta*, no DSV manifold pass).
PAPER_VARIANT: dict[str, Any] = {"stat_target": "theta", "stat_distance": "l1", "stat_at": "theta_star",
                                 "aug_weight": 0.0}
STAT_VARIANTS: tuple[str, ...] = ("project", "paper")
EXECUTORS: tuple[str, ...] = ("process", "ray")  # server/sweep/cell_pool.py, server/sweep/ray_pool.py

# DSA vocabulary (common/augment.py implements the ops and re-exports these names).
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
# Groups the reference's AUGMENT_FNS knows, plus the individual color ops
# (handy for ablations; the reference strategy never produces them).
DSA_OPS: tuple[str, ...] = (
    "color", "crop", "cutout", "flip", "scale", "rotate",
    "brightness", "saturation", "contrast",
)
_NONE = "none"


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """Split an '_'-separated strategy into ops; ValueError for unknown ops.

    "" / "none" mean no augmentation and return ``()``.
    """
    if not isinstance(strategy, str):
        raise ValueError(f"strategy must be a string, got {strategy!r}")
    s = strategy.strip().lower()
    if s in ("", _NONE):
        return ()
    ops = tuple(p for p in s.split("_") if p)
    bad = [p for p in ops if p not in DSA_OPS]
    if bad or not ops:
        raise ValueError(
            f"unknown DSA op(s) {bad} in strategy {strategy!r}; valid ops: {list(DSA_OPS)}"
        )
    return ops


class ConfigError(ValueError):
    """A setting is malformed; the message names the dotted key, the value and where it came from."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """The hint `` (did you mean 'rounds'?)`` naming the option closest to a mistyped ``word``; "" when none is."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def fail(source: str | None, key: str, text: str) -> ConfigError:
    """The error for ``key``: '<source>: key '<key>' <text>' (no source: a config built in Python)."""
    return ConfigError(f"{source + ': ' if source else ''}key '{key}' {text}")


def knob(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None,  # noqa: A002 - argparse's word
         choices: tuple[str, ...] | None = None, gt: float | None = None, ge: float | None = None,
         lt: float | None = None, limit: float | None = None, seed: bool = False, check: Any = None,
         sweep: bool = False, cli_alias: str | None = None) -> Any:
    """A config field: its default, its help text (CLI --help, scenarios/README.md) and its checks.

    choices: allowed strings; gt / ge: lower bound (> / >=); lt: upper bound (<, with ge: 'in [ge, lt)');
    limit: largest sensible value (above it is a typo); seed: 0 .. 2**32-1; check: callable raising
    ValueError; sweep: a grid axis of the scenario, not an engine knob (no CLI flag, not in
    ``engine_dict``); cli_alias: an older flag name kept working. List fields apply them per item.
    """
    rules = {"choices": choices, "gt": gt, "ge": ge, "lt": lt, "limit": limit, "seed": seed, "check": check,
             "sweep": sweep, "cli_alias": cli_alias}
    meta = {"help": help, **{k: v for k, v in rules.items() if v is not None and v is not False}}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------- types (YAML values -> dataclass tree)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
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
                return coerce(value, option, key, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            value = [value]  # a scalar where a grid is expected means a grid of one
        if not value:
            raise fail(source, key, "must be a non-empty list")
        return [coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise fail(source, key, f"must be a mapping, got {type(value).__name__}")
        return build(tp, value, key, source)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > MAX_ABS_INT:
            raise fail(source, key, f"is {value}, beyond any sensible setting (|x| <= 2**53)")
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        # NaN passes every `< 0` check and inf waits forever: no setting may be either
        raise fail(source, key, f"must be a finite number, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise fail(source, key, f"must be true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise fail(source, key, f"must be an integer, got {value!r}")
    if tp is int and abs(value) > MAX_ABS_INT:
        raise fail(source, key, f"is {value}, beyond any sensible setting (|x| <= 2**53)")
    if not isinstance(value, tp):
        raise fail(source, key, f"must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name != "source"]  # Scenario.source: where it was read from


def build(cls: type, values: dict[str, Any], prefix: str, source: str | None) -> Any:
    """``cls`` from a mapping: unknown keys and wrong types are errors naming the dotted key."""
    hints = get_type_hints(cls)
    names = {f.name for f in _fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{source + ': ' if source else ''}unknown key '{where}{unknown[0]}'"
                          f"{did_you_mean(unknown[0], names)}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {name: coerce(value, hints[name], f"{prefix}.{name}" if prefix else name, source)
              for name, value in values.items()}
    return cls(**kwargs)


# ---------------------------------------------------------------- values (each field's rules)


def _check_value(value: Any, meta: Any, key: str, source: str | None) -> None:
    if value is None:
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(item, meta, f"{key}[{i}]", source)
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise fail(source, key, f"is {value!r}{hint}; choose one of {', '.join(choices)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        gt, ge, lt = meta.get("gt"), meta.get("ge"), meta.get("lt")
        if lt is not None and not ((ge is None or value >= ge) and value < lt):
            raise fail(source, key, f"must be in [{ge:g}, {lt:g}), got {value}" if ge is not None else
                       f"must be < {lt:g}, got {value!r}")
        if gt is not None and not value > gt:
            raise fail(source, key, f"must be > {gt:g}, got {value!r}")
        if ge is not None and not value >= ge:
            raise fail(source, key, f"must be >= {ge:g}, got {value!r}")
        if meta.get("seed") and not 0 <= value <= SEED_MAX:
            raise fail(source, key, f"must be in 0..{SEED_MAX} (2**32 - 1), got {value}")
        limit = meta.get("limit")
        if limit is not None and value > limit:
            raise fail(source, key, f"is {value}, above the limit {limit}; is it a typo?")
    check = meta.get("check")
    if check is not None:
        try:
            check(value)
        except ValueError as err:
            raise fail(source, key, f"is {value!r}: {err}") from None


def check_tree(obj: Any, prefix: str, source: str | None) -> None:
    """Every field of ``obj`` (and of its nested sections): type, then its knob rules, then the
    section's ``check_combinations(prefix, source)`` when it has one."""
    hints = get_type_hints(type(obj))
    for f in _fields(type(obj)):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            check_tree(value, key, source)
            continue
        coerce(value, hints[f.name], key, source)  # a config built in Python has not been through build()
        _check_value(value, f.metadata, key, source)
    combinations = getattr(obj, "check_combinations", None)
    if combinations is not None:
        combinations(prefix, source)


def engine_fields(cls: type) -> list[dataclasses.Field]:
    """The fields the engine reads (not the scenario's grid axes)."""
    return [f for f in _fields(cls) if not f.metadata.get("sweep")]


# ---------------------------------------------------------------- appendix A defaults (resolved here only)


def default_alpha(pipc: int) -> float:
    """Appendix A: 0.1 / 0.01 / 0.001 for pipc 10 / 50 / all (pipc <= 10, <= 50, more; -1 = 'all')."""
    if 0 <= pipc <= 10:
        return 0.1
    if 0 <= pipc <= 50:
        return 0.01
    return 0.001


def default_gamma(ipc: int) -> float:
    """Appendix A: 0.01 for ipc 50, 0.001 otherwise (we use 0.01 for every ipc >= 50)."""
    return 0.01 if ipc >= 50 else 0.001


def default_init(ipc: int) -> str:
    """Appendix A: noise for ipc 1, real safe images for ipc >= 3 (and for ipc 2)."""
    return "noise" if ipc <= 1 else "real"


# ---------------------------------------------------------------- device profiles

# Settings whose best value depends on the device (bench/README.md measured both): key -> (CPU value, GPU value).
# A null in the scenario or the engine's config takes the device's value; an explicit value always wins.
DEVICE_PROFILE: dict[str, tuple[Any, Any]] = {
    "distill.dm_max_batch": (256, 0),
    "evaluation.parallel_models": (False, True),
}


def profile_value(key: str, value: Any, device_type: str) -> Any:
    """``value`` of DEVICE_PROFILE's ``key``, or the profile's value for ``device_type`` ('cpu', 'cuda', ...) when None."""
    if value is not None:
        return value
    cpu, gpu = DEVICE_PROFILE[key]
    return cpu if device_type == "cpu" else gpu


# ---------------------------------------------------------------- the engine's configs = the scenario's sections


@dataclass
class DistillConfig:
    """Scenario section ``distill``: the grid axes (sweep) and the settings of ``common.distill.synthesize``."""

    methods: list[str] = knob(factory=lambda: ["dm", "dkkt_dm", "random_real"], choices=METHODS, sweep=True,
                              help="dm | dsv | dsv_real | dkkt_dm | blend | dm_from_dsv | random_real | safe_all "
                                   "(one column each)")
    ipc: list[int] = knob(factory=lambda: [1], gt=0, limit=MAX_IPC, sweep=True,
                          help="synthetic images per class (grid rows)")
    pipc: list[int | str] = knob(factory=lambda: [10], sweep=True,
                                 help="ints >= 0, or 'all' (= -1): every client image")
    iterations: int = knob(1000, "optimisation steps per distillation cell (paper: 20000)", ge=0, limit=10_000_000)
    lr_img: float = knob(1.0, "learning rate of the synthetic images (SGD)", gt=0)
    momentum_img: float = knob(0.5, "momentum of the image optimiser", ge=0, lt=1)
    lr_lambda: float = knob(0.05, "lr of the multipliers' optimizer: of log lambda (lambda_param log) or lambda "
                             "(clamp)", gt=0)
    alpha: float | None = knob(None, "None: appendix A rule by pipc (0.1 / 0.01 / 0.001)", ge=0)
    gamma: float | None = knob(None, "None: appendix A rule by ipc (0.01 for ipc 50, else 0.001)", ge=0)
    init: str = knob("auto", "auto (appendix A: noise for ipc 1, real otherwise, the same for every method of a "
                     "grid; dsv, dsv_real and dm_reference fix their own) | noise | real", choices=INITS)
    safe_draw: str = knob("random", "which pipc images per class of the pool a cell uses: random (a seeded draw per "
                          "distillation seed, nested across pipc) | first (stored order, every seed)",
                          choices=("random", "first"))
    real_batch: int = knob(256, "real safe images per class drawn per DM iteration", gt=0, limit=1_000_000)
    dm_max_batch: int | None = knob(None, "most images per DM forward (classes never split; 0 = all in one forward); "
                                    "null: the device's profile (256 on the CPU, 0 on a GPU)", ge=0)
    # The CPU's 256 keeps small pools (pipc 10: 100 real images) in one forward and takes large ones class by class:
    # on the full Fashion-MNIST pool one forward costs 2.7-3.6x the per-class loop on the CPU, while on a GPU the
    # per-class loop is launch-bound and one forward takes 0.68x its time (bench/README.md, "DM on the full pool").
    dsa: bool = knob(True, "differentiable siamese augmentation in the DM / DKKT losses")
    time_budget_s: float | None = knob(None, "wall-clock seconds per distillation cell, stops early (null: no limit)",
                                       gt=0, cli_alias="time-budget")
    checkpoint_every: int = knob(0, "save the synthetic set every N iterations (0: never)", ge=0)
    stat_distance: str = knob("cosine", "D of L_stat: cosine | l1 | l2 (common/distill/dkkt.py: why cosine)",
                              choices=STAT_DISTANCES)
    stat_target: str = knob("update", "what -sum lambda_i grad L_i must reach: update (theta* - theta_0) | "
                            "theta (theta*)", choices=("update", "theta"))
    stat_relative: bool = knob(False, "divide L_stat by D(target, 0) (l1 / l2 only; cosine is already relative)")
    primal: str = knob("ce", "ce (paper Eq. 3) | hinge (Deep Support Vectors Eq. 7)", choices=PRIMAL_MODES)
    aug_weight: float = knob(5.0, "eta: weight of the DKKT terms on augmented images (manifold condition)", ge=0)
    lambda_init: float = knob(1.0, "initial Lagrange multipliers (> 0 with lambda_param log)", ge=0)
    lambda_param: str = knob("log", "log (lambda = exp(rho), always > 0) | clamp (lambda, projected onto >= 0)",
                             choices=("log", "clamp"))
    lambda_autoscale: bool = knob(False, "start lambda at the least-squares scale of the target (l1 / l2)")
    # The paper names no image optimizer. A comparison tunes it per method on the validation split
    # (data.validation_size, scenarios/tune.py) and sets the winners in method_settings; this default only
    # has to be the same for every method of a grid.
    img_optimizer: str = knob("adam", "adam | sgd: one optimizer for every method | auto (SGD for dm, Adam for "
                              "DKKT; confounds loss and optimizer)", choices=("adam", "sgd", "auto"))
    lr_img_adam: float = knob(0.1, "image lr when the image optimizer is Adam", gt=0)
    seeds: list[int] | None = knob(None, "distillation+evaluation seeds of the sweep; None: [seed]", seed=True,
                                   sweep=True)
    resume: bool = knob(True, "reuse finished cells (and this folder's theta*/T') whose config matches", sweep=True)
    workers: int = knob(0, "processes computing cells side by side: 0 = one per core on the CPU, 1 on a GPU "
                        "(server/sweep/cell_pool.py); with executor ray: most chains in flight (0: the cluster's CPUs)",
                        ge=0, limit=1024, sweep=True)
    executor: str = knob("process", "where the cells run: process (worker processes on this machine) | ray (tasks "
                         "on a Ray cluster, server/sweep/ray_pool.py)", choices=EXECUTORS, sweep=True)
    ray_address: str | None = knob(None, "executor ray: the cluster to connect to (ray.init address: 'auto', "
                                   "'ray://host:10001', 'host:6379'); null: $RAY_ADDRESS, else the Ray runtime this "
                                   "process already runs (Flower's simulation), else a local one", sweep=True)
    ray_max_retries: int = knob(3, "executor ray: times a chain whose worker or node died is run again elsewhere",
                                ge=0, limit=100, sweep=True)
    ray_gpus: float = knob(1.0, "executor ray with a cuda device: GPUs each chain reserves (0.5: two chains per GPU)",
                           gt=0, limit=64, sweep=True)
    cells: str | None = knob(None, "compute only the cells matching this filter ('ipc=10', 'method=dm,dkkt_dm; "
                             "pipc=50'): a shard of the grid; null: every cell", sweep=True)
    shard: str | None = knob(None, "compute only shard k of N ('1/3'): every N-th chain of the grid, starting at "
                             "the k-th; null: every cell", sweep=True)
    # Knobs that were engine-only before the sections and the engine's configs became one model:
    dsa_strategy: str = knob(DSA_STRATEGY, "DSA ops of distillation, '_'-separated (none: no augmentation)",
                             check=parse_strategy)
    log_every: int = knob(10, "loss-history entry every N iterations (loss traces, cell info)", ge=1)
    lambda_optimizer: str = knob("adam", "optimizer of the multipliers lambda: adam | sgd", choices=("adam", "sgd"))
    # DKKT speed-ups that APPROXIMATE the loss, both off by default (exact DSV / Eq. 4); their cost and accuracy
    # are measured in bench/README.md, section "DKKT approximations".
    aug_passes: str = knob("both", "DKKT passes per iteration: both (clean + augmented, exact) | sample (one, the "
                           "augmented with probability aug_weight / (1 + aug_weight): unbiased, half the cost)",
                           choices=AUG_PASSES)
    stat_candidates: int = knob(0, "stationarity sum over this many random candidates per iteration, scaled by "
                                "N / m (0: every candidate, exact); the primal always covers all", ge=0)
    # Where the inner gradients of L_stat are taken (common/distill/dkkt.py, stationarity_points). At theta* real
    # data cannot satisfy the condition for a briefly trained theta* (docs/mechanism.md); at theta_0 the target
    # theta* - theta_0 is the direction of the clients' first updates.
    stat_at: str = knob("theta_star", "inner gradients of L_stat at: theta_star (Eq. 3) | theta0 (the network FedAvg "
                        "started from) | path (mean over stat_path_points points of the line theta_0 -> theta*); "
                        "theta0 / path need stat_target update", choices=STAT_AT)
    stat_path_points: int = knob(3, "points of the straight path theta_0 -> theta* (both ends included) for stat_at "
                                 "path; each costs one stationarity pass", ge=2, limit=100)
    stat_variant: str = knob("project", "project (the stat_* / aug_weight keys as set) | paper (Eq. 3-4 literally: "
                             "stat_target theta, stat_distance l1, stat_at theta_star, aug_weight 0; a value of those keys "
                             "other than its default or the paper's is an error)", choices=STAT_VARIANTS)
    # A diagnostic only (no effect on S): after a DKKT cell, cos(target, -sum lambda_i grad L_i) for safe images and
    # the synthetic set at points of the path theta_0 -> theta* (common/distill/stationarity.py, traces/).
    diagnose_samples: int = knob(100, "safe images (at most) in the stationarity diagnostic of each DKKT cell; "
                                 "0: no diagnostic", ge=0, limit=100_000)
    diagnose_path_points: int = knob(5, "points of the path theta_0 -> theta* where the diagnostic takes gradients "
                                     "(1: theta* only)", ge=1, limit=100)

    method_settings: dict = knob(factory=dict, sweep=True,
                                 help="per-method settings, e.g. {dm: {img_optimizer: sgd, lr_img: 1.0}}: each "
                                      "method's own tuned image optimizer (keys: " + ", ".join(METHOD_SETTINGS)
                                      + "); the rest of the section holds for every method")

    def check_combinations(self, prefix: str, source: str | None) -> None:
        if self.lambda_param == "log" and not self.lambda_init > 0:
            raise fail(source, f"{prefix}.lambda_init", f"must be > 0 when lambda_param is 'log', got {self.lambda_init}")
        for method, settings in self.method_settings.items():
            key = f"{prefix}.method_settings.{method}"
            if method not in METHODS:
                raise fail(source, f"{prefix}.method_settings", f"names {method!r}, not a method; valid: "
                           f"{', '.join(METHODS)}")
            if not isinstance(settings, dict):
                raise fail(source, key, f"must be a mapping of settings, got {type(settings).__name__}")
            bad = sorted(set(settings) - set(METHOD_SETTINGS))
            if bad:
                raise fail(source, f"{key}.{bad[0]}", f"cannot differ between methods; per-method keys: "
                           f"{', '.join(METHOD_SETTINGS)}")
            hints = get_type_hints(type(self))
            fields = {f.name: f for f in _fields(type(self))}
            for name, value in settings.items():
                value = coerce(value, hints[name], f"{key}.{name}", source)
                _check_value(value, fields[name].metadata, f"{key}.{name}", source)
        if self.stat_variant == "paper":
            defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in PAPER_VARIANT}
            for key, paper in PAPER_VARIANT.items():
                value = getattr(self, key)
                if value not in (paper, defaults[key]):
                    raise fail(source, f"{prefix}.{key}", f"is {value!r}, but stat_variant 'paper' sets it to "
                               f"{paper!r}; remove the key or set stat_variant 'project'")
        if self.stat_at != "theta_star" and self.stat_target != "update" and self.stat_variant != "paper":
            raise fail(source, f"{prefix}.stat_at", f"is {self.stat_at!r}, which needs stat_target 'update' (the "
                       f"target theta* - theta_0), got stat_target {self.stat_target!r}")

    def for_method(self, method: str) -> "DistillConfig":
        """The settings ``method`` runs with: the section, with its ``method_settings`` entry applied."""
        settings = self.method_settings.get(method) or {}
        if not settings:
            return self
        hints = get_type_hints(type(self))
        return dataclasses.replace(self, **{k: coerce(v, hints[k], k, None) for k, v in settings.items()})

    def resolved(self) -> "DistillConfig":
        """The settings the engine runs: ``stat_variant`` 'paper' replaced by the keys it stands for."""
        if self.stat_variant == "paper":
            return dataclasses.replace(self, **PAPER_VARIANT)
        return self

    def validate(self) -> "DistillConfig":
        """Check a config built in Python (a scenario's is checked when loaded); errors say DistillConfig.<key>."""
        check_tree(self, type(self).__name__, None)
        return self

    def engine_dict(self) -> dict[str, Any]:
        """The engine's settings (no grid axes): what a cell record and a synthetic set's info store."""
        return {f.name: getattr(self, f.name) for f in engine_fields(type(self))}

    def alpha_for(self, pipc: int) -> float:
        return self.alpha if self.alpha is not None else default_alpha(pipc)

    def gamma_for(self, ipc: int) -> float:
        return self.gamma if self.gamma is not None else default_gamma(ipc)


@dataclass
class EvalConfig:
    """Scenario section ``evaluation``: how ``common.evaluate`` trains fresh networks on S and tests them."""

    optimizer: str = knob("sam", "sam (paper) | sgd (DM reference protocol)", choices=OPTIMIZERS)
    epochs: int = knob(300, "training epochs of each evaluation model (the paper uses 5000)", gt=0, limit=1_000_000)
    lr: float | None = knob(None, "None: 0.1 for sam, 0.01 for sgd", gt=0)
    rho: float = knob(0.001, "SAM neighbourhood size", ge=0)
    momentum: float = knob(0.9, "optimizer momentum", ge=0, lt=1)
    weight_decay: float = knob(5e-4, "optimizer weight decay", ge=0)
    batch_size: int = knob(256, "training batch size", gt=0, limit=1_000_000)
    dsa: bool = knob(True, "DSA augmentation while training on S")
    split: str = knob("test", "held-out images that score each cell: test (the final table, once) | validation "
                      "(data.validation_size training images: tuning and every other choice)",
                      choices=("test", "validation"))
    num_models: int = knob(3, "fresh networks trained on S per cell (mean ± std over them)", gt=0, limit=1_000,
                           cli_alias="num-models")
    width: int = knob(128, "evaluation ConvNet, the same for every method whatever theta*'s architecture", gt=0,
                      limit=8192)
    depth: int = knob(3, "conv blocks of the evaluation ConvNet", gt=0, limit=16)
    # Knobs that were engine-only before the sections and the engine's configs became one model:
    lr_decay_at_half: bool = knob(True, "lr x0.1 at half of the epochs")
    dsa_strategy: str = knob(DSA_STRATEGY, "DSA ops while training on S, '_'-separated (none: no augmentation)",
                             check=parse_strategy)
    # The CPU runs the models one after the other (vmap: 0.55-0.84x the sequential speed); a GPU trains them in
    # lockstep (1.62x / 1.48x / 0.89x at ipc 1 / 10 / 50 on an H200, bench/README.md).
    parallel_models: bool | None = knob(None, "train the num_models networks in lockstep with torch.func.vmap "
                                        "(same results up to float rounding); null: the device's profile (off on "
                                        "the CPU, on on a GPU)")

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 0.1 if self.optimizer == "sam" else 0.01

    def validate(self) -> "EvalConfig":
        """Check a config built in Python (a scenario's is checked when loaded); errors say EvalConfig.<key>."""
        check_tree(self, type(self).__name__, None)
        return self


# ---------------------------------------------------------------- command-line flags generated from the fields


def _flag_type(tp: Any) -> Any:
    options = [o for o in get_args(tp) if o is not type(None)] if get_origin(tp) in (Union, types.UnionType) else [tp]
    return options[0] if len(options) == 1 and options[0] in (int, float, str, bool) else None


def add_arguments(group: Any, cls: type, prefix: str = "") -> None:
    """One flag per engine field of ``cls``: ``--<prefix><kebab-name>`` (and its ``cli_alias``), the field's
    type, default and help; booleans get ``--x`` / ``--no-x``. The dest is ``<prefix>_<name>``."""
    hints = get_type_hints(cls)
    for f in engine_fields(cls):
        tp = _flag_type(hints[f.name])
        if tp is None:
            continue
        names = [f"--{prefix}{f.name.replace('_', '-')}"]
        if f.metadata.get("cli_alias"):
            names.append(f"--{f.metadata['cli_alias']}")
        dest = f"{prefix.replace('-', '_')}{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        text = f"{f.metadata.get('help', '')} (default: {default})"
        if tp is bool:
            group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            group.add_argument(*names, dest=dest, type=tp, default=default, choices=f.metadata.get("choices"),
                               help=text)


def from_arguments(cls: type, args: argparse.Namespace, prefix: str = "", section: str | None = None) -> Any:
    """``cls`` from the flags ``add_arguments(…, cls, prefix)`` added. With ``section`` (the scenario's name
    for it: distill, evaluation) it is checked, errors naming the scenario key ('distill.lr_img')."""
    dest = prefix.replace("-", "_")
    values = {f.name: getattr(args, f"{dest}{f.name}") for f in engine_fields(cls) if hasattr(args, f"{dest}{f.name}")}
    obj = cls(**values)
    if section is not None:
        check_tree(obj, section, f"flags (--{prefix}<key> sets {section}.<key>)")
    return obj
