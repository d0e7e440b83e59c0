"""YAML scenario schema: defaults, validation, overrides, and the resolved copy saved with every run.

A scenario is a tree of dataclasses whose fields are ``common.config.knob``s: each carries its
default, its meaning and its checks, and ``distill`` / ``evaluation`` are the engine's own
``DistillConfig`` / ``EvalConfig`` (common/config.py). scenarios/README.md's key reference is
generated from these fields. Validation runs before any work starts and every error names the
offending key (dotted path), the value and the file it came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.atomic import atomic_write_text
from common.config import (DEVICE_PROFILE, ConfigError, DistillConfig, EvalConfig, build, check_tree, fail, knob,
                           profile_value)
from common.dataset_meta import DATASETS as DATASET_REGISTRY, get_meta  # torch-free: server.check never loads torch
from common.grid import PIPC_ALL, normalize_pipc, parse_cell_filter, parse_shard, pipc_label, select_cells, static_skip_reason
from common.methods import NO_MODEL_METHODS, optimizes, spec  # the method registry

APP_DIR = Path(__file__).resolve().parents[1]
DEFAULT_SCENARIO = "scenarios/quickstart.yaml"

DATASETS = tuple(DATASET_REGISTRY)  # the one registry of dataset names: common/dataset_meta.py
PARTITIONS = ("iid", "dirichlet", "shards")
STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")  # flwr.serverapp.strategy
NORM_ACTIONS = ("reject", "clip")
SAFE_POLICIES = ("random", "first")
NORMS = ("instancenorm", "batchnorm", "layernorm", "none")
ACTIVATIONS = ("relu", "leakyrelu", "sigmoid")
POOLINGS = ("avgpooling", "maxpooling", "none")

ScenarioError = ConfigError  # a scenario value is malformed; the message names the key and the file


@dataclass
class DataConfig:
    dataset: str = knob("fashion-mnist", " | ".join(DATASETS), choices=DATASETS)
    root: str | None = knob(None, "local folder with the dataset files (searched first)")
    download: bool = knob(False, "allow a torchvision download when no local copy is found")
    train_limit: int | None = knob(None, "use only the first N training images (fast studies)", gt=0)
    test_limit: int | None = knob(None, "use only the first N test images", gt=0)
    validation_size: int = knob(0, "class-balanced training images held out before train_limit: no client trains "
                                "on or shares them; they score every hyperparameter choice (evaluation.split, "
                                "federation.plateau_rounds); 0: none", ge=0, limit=10_000_000)


@dataclass
class FederationConfig:
    num_clients: int | None = knob(None, "None: as many clients as the federation has nodes", gt=0, limit=100_000)
    partition: str = knob("iid", "iid | dirichlet | shards", choices=PARTITIONS)
    dirichlet_alpha: float = knob(0.5, "concentration of the Dirichlet label split (partition dirichlet); "
                                  "small = skewed", gt=0)
    shards_per_client: int = knob(2, "label shards per client (partition shards)", gt=0, limit=100_000)
    rounds: int = knob(2, "FedAvg rounds (0: theta* is the initial model); the most rounds with plateau_rounds",
                       ge=0, limit=100_000)
    plateau_rounds: int = knob(0, "stop FedAvg once the global model's validation accuracy has not risen by more "
                               "than plateau_delta over this many rounds (0: always run `rounds`; needs "
                               "data.validation_size)", ge=0, limit=100_000)
    plateau_delta: float = knob(0.3, "accuracy points the best validation accuracy must gain within plateau_rounds",
                                ge=0)
    local_epochs: int = knob(1, "local SGD epochs per round on each client", gt=0, limit=100_000)
    batch_size: int = knob(64, "local training batch size", gt=0, limit=1_000_000)
    lr: float = knob(0.01, "local SGD learning rate", gt=0)
    momentum: float = knob(0.9, "local SGD momentum", ge=0)
    weight_decay: float = knob(5e-4, "local SGD weight decay", ge=0)
    min_clients: int = knob(1, "fewer answering clients than this stops the run", gt=0)
    reply_timeout_s: float = knob(600.0, "seconds the server waits for client replies per request", gt=0,
                                  limit=7 * 24 * 3600.0)
    client_eval: bool = knob(False, "federated evaluation on each client's held-out part")
    holdout_fraction: float = knob(0.1, "part of each shard held out for client evaluation", ge=0, lt=1)
    augment: bool = knob(False, "DSA during local training")
    strategy: str = knob("fedavg", "aggregation of the client models, Flower's own class: fedavg | fedmedian | "
                         "fedtrimmedavg | krum | multikrum | bulyan", choices=STRATEGIES)
    byzantine_clients: int = knob(0, "krum | multikrum | bulyan: clients assumed malicious (f); multikrum averages "
                                  "the n - f best, bulyan needs n >= 4f + 3", ge=0, limit=100_000)
    trim_beta: float = knob(0.2, "fedtrimmedavg: fraction cut from each tail per coordinate", ge=0, lt=0.5)
    update_norm_bound: float | None = knob(10.0, "largest L2 norm of a client's update (its weights minus the "
                                           "global model's) as a multiple of the global model's norm (honest "
                                           "rounds stay well under 1); None: no bound", gt=0)
    update_norm_action: str = knob("reject", "an update beyond update_norm_bound: reject (left out, reported) | "
                                   "clip (scaled to the bound, reported)", choices=NORM_ACTIONS)


@dataclass
class ModelConfig:
    width: int = knob(128, "channels of each conv layer of ConvNet (paper: 128)", gt=0, limit=8192)
    depth: int = knob(3, "conv blocks of ConvNet (paper: 3)", gt=0, limit=16)
    norm: str = knob("instancenorm", "instancenorm | batchnorm | layernorm | none", choices=NORMS)
    activation: str = knob("relu", "relu | leakyrelu | sigmoid", choices=ACTIVATIONS)
    pooling: str = knob("avgpooling", "avgpooling | maxpooling | none", choices=POOLINGS)


@dataclass
class SafeConfig:
    policy: str = knob("random", "random | first: kept for old scenario files; a device picks the images it "
                       "shares by its own node setting safe-policy (edge_client/policy.py), never by this key",
                       choices=SAFE_POLICIES)


FAULT_MODES = ("raise", "timeout", "drop_after_train", "malformed")
FAULT_PHASES = ("train", "evaluate", "query")


@dataclass
class FaultsConfig:
    """Injected client faults (reliability tests): the listed partitions fail in the listed phases."""

    clients: list[int] | None = knob(None, "partition ids; None: no faults (a non-empty list otherwise)")
    mode: str = knob("raise", "raise | timeout | drop_after_train | malformed")
    phases: list[str] = knob(factory=lambda: ["train", "evaluate", "query"],
                             help="phases in which the listed clients fail: train | evaluate | query")
    seed: int = knob(0, "picks the malformation kind per (client, phase)", ge=0, seed=True)


PRIVACY_MODES = ("model", "no_model_access")
DP_SIDES = ("server", "client")
DSV_COMBINE = ("average", "median", "select")


@dataclass
class DPConfig:
    """Differentially private FedAvg with Flower's fixed-clipping wrappers (see server/federation/modes.py)."""

    enabled: bool = knob(False, "DP-FedAvg (Flower's fixed-clipping DP wrappers) on or off")
    side: str = knob("server", "server (DifferentialPrivacyServerSideFixedClipping) | client (+ fixedclipping_mod)",
                     choices=DP_SIDES)
    clipping_norm: float = knob(1.0, "L2 bound of each client's model update", gt=0)
    noise_multiplier: float = knob(0.1, "Gaussian noise stdev = noise_multiplier * clipping_norm / num_clients", ge=0)
    delta: float = knob(1e-5, "delta at which privacy.md and results.md state the run's client-level epsilon "
                        "(Flower's RDP accountant)", gt=0, lt=1)


@dataclass
class PrivacySection:
    mode: str = knob("model", "model (FedAvg, clients upload weights) | no_model_access (clients upload DSVs)",
                     choices=PRIVACY_MODES)
    local_epochs: int | None = knob(None, "no_model_access: local epochs before extraction (None: rounds x "
                                    "local_epochs)", gt=0, limit=100_000)
    dsv_iterations: int = knob(100, "no_model_access: DKKT iterations of the client-side extraction", gt=0,
                               limit=10_000_000)
    dsv_combine: str = knob("average", "no_model_access: N clients' DSVs -> ipc per class (average | median: "
                            "coordinate-wise, one poisoner cannot move it | select)",
                            choices=DSV_COMBINE)
    audit: bool = knob(True, "nearest-private-image audit of every synthetic set (privacy_audit.csv)")
    audit_reference: int = knob(500, "held-out test images sampled for the audit's reference distribution", gt=0,
                                limit=10_000_000)
    dp: DPConfig = knob(factory=DPConfig)


@dataclass
class Scenario:
    name: str = knob("scenario", "run name; the default run folder is runs/<name>")
    seed: int = knob(0, "seed of every random choice (partition, init, safe order, distillation, evaluation)",
                     ge=0, seed=True)
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    output_dir: str | None = knob(None, "run folder; null: runs/<name>; relative paths resolve against the "
                                  "working directory")
    reuse_artifacts: str | None = knob(None, "run folder with global_model.pt + safe_pool.pt")
    data: DataConfig = knob(factory=DataConfig)
    federation: FederationConfig = knob(factory=FederationConfig)
    model: ModelConfig = knob(factory=ModelConfig)
    safe: SafeConfig = knob(factory=SafeConfig)
    distill: DistillConfig = knob(factory=DistillConfig)
    evaluation: EvalConfig = knob(factory=EvalConfig)
    privacy: PrivacySection = knob(factory=PrivacySection)
    faults: FaultsConfig = knob(factory=FaultsConfig)
    source: str = dataclasses.field(default="<dict>", compare=False)  # file it was read from (not a key)

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


# ---------------------------------------------------------------- validation


def validate(s: Scenario) -> Scenario:
    """Reject impossible values and combinations before any work starts.

    Each field's own rules (type, choices, bounds, typo limits) come from its knob (common/config.py);
    what follows are the rules that involve more than one field or only hold for a scenario."""
    src = s.source
    if type(s.distill.iterations) is int and s.distill.iterations < 1:
        # the engine takes 0 (it returns the start); a scenario of 0-step cells is a typo
        raise fail(src, "distill.iterations", f"must be > 0, got {s.distill.iterations!r}")
    check_tree(s, "", src)
    if not (s.device == "auto" or s.device == "cpu" or s.device.startswith("cuda")):
        raise fail(src, "device", f"is {s.device!r}; use auto, cpu, cuda or cuda:N")
    if not s.name or any(c in s.name for c in "/\\\0") or s.name in (".", ".."):
        # the default run folder is runs/<name>: a name that is a path would put the run elsewhere
        raise fail(src, "name", f"must be a folder name (no '/', '\\', '.' or '..'), got {s.name!r}")
    if s.output_dir is not None and ".." in Path(str(s.output_dir)).parts:
        raise fail(src, "output_dir", f"is {s.output_dir!r}: '..' leaves the output folder; give the folder itself "
                                      "(absolute, or relative without '..')")
    if len(set(s.distill.methods)) != len(s.distill.methods):
        raise fail(src, "distill.methods", f"lists a method twice: {s.distill.methods}")
    if s.privacy.mode == "model" and s.federation.rounds < 1:
        raise ScenarioError(f"{src}: key 'federation.rounds' must be >= 1 (0 rounds would distill from an "
                            "untrained model), got 0")
    _validate_grid(s)
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
    _validate_strategy(s)
    _validate_privacy(s)
    _validate_validation_split(s)
    return s


def _validate_validation_split(s: Scenario) -> None:
    """Choices scored on held-out training images need those images (data.validation_size)."""
    if s.data.validation_size:
        return
    if s.evaluation.split == "validation":
        raise fail(s.source, "evaluation.split", "is 'validation' but data.validation_size is 0: hold out "
                   "training images (e.g. data.validation_size: 5000)")
    if s.federation.plateau_rounds:
        raise fail(s.source, "federation.plateau_rounds", f"is {s.federation.plateau_rounds} but "
                   "data.validation_size is 0: the plateau is judged on validation images, never on the test split")


def _validate_strategy(s: Scenario) -> None:
    """The robust strategies' assumed attackers must leave enough honest clients to aggregate."""
    f = s.federation
    n = f.num_clients
    if f.byzantine_clients and f.strategy not in ("krum", "multikrum", "bulyan"):
        raise fail(s.source, "federation.byzantine_clients", f"is {f.byzantine_clients} but only krum, multikrum "
                   f"and bulyan use it (federation.strategy is {f.strategy!r})")
    if n is None:
        return
    if f.strategy == "bulyan" and n < 4 * f.byzantine_clients + 3:
        raise fail(s.source, "federation.strategy", f"is 'bulyan', which needs num_clients >= 4 * byzantine_clients "
                   f"+ 3 = {4 * f.byzantine_clients + 3}, got {n} clients")
    if f.strategy in ("krum", "multikrum") and n <= f.byzantine_clients:
        raise fail(s.source, "federation.byzantine_clients", f"is {f.byzantine_clients}, not fewer than the "
                   f"{n} clients")


def _validate_privacy(s: Scenario) -> None:
    """The privacy section: modes, client-side DSV budget, DP parameters (see server/federation/modes.py)."""
    src, p = s.source, s.privacy
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
    if d.seeds is not None and len(set(d.seeds)) != len(d.seeds):
        raise ScenarioError(f"{src}: key 'distill.seeds' lists a seed twice: {d.seeds}")
    _validate_part(s)
    for method in d.methods:
        reasons = [static_skip_reason(method, ipc, pipc, d.init) for ipc in d.ipc for pipc in d.pipc]
        if all(reasons):
            raise ScenarioError(
                f"{src}: key 'distill.pipc' / 'distill.ipc': no cell of method '{method}' can run: {reasons[0]}; "
                "add a larger pipc, a smaller ipc, or drop the method"
            )


def _validate_part(s: Scenario) -> None:
    """distill.cells / distill.shard: well-formed, naming values of the grid, selecting at least one cell."""
    src, d = s.source, s.distill
    grid = {"method": list(d.methods), "ipc": list(d.ipc), "pipc": list(d.pipc), "seed": list(d.seeds or [s.seed])}
    if d.cells:
        try:
            wanted = parse_cell_filter(d.cells)
        except ValueError as err:
            raise fail(src, "distill.cells", f"is {d.cells!r}: {err}") from None
        for key, values in wanted.items():
            missing = sorted(str(pipc_label(v) if key == "pipc" else v) for v in values if v not in grid[key])
            if missing:
                axis = {"method": "methods", "seed": "seeds"}.get(key, key)
                raise fail(src, "distill.cells", f"is {d.cells!r}: {key} {', '.join(missing)} is not in the grid "
                           f"(distill.{axis}: {[pipc_label(v) if key == 'pipc' else v for v in grid[key]]})")
    if d.shard:
        try:
            parse_shard(d.shard)
        except ValueError as err:
            raise fail(src, "distill.shard", f"is {d.shard!r}: {err}") from None
    specs = [_Cell(m, ipc, pipc, seed) for pipc in d.pipc for ipc in d.ipc for seed in grid["seed"] for m in d.methods]
    if (d.cells or d.shard) and not select_cells(specs, d.methods, d.cells, d.shard):
        raise fail(src, "distill.shard" if d.shard else "distill.cells",
                   f"selects no cell of the grid (cells {d.cells!r}, shard {d.shard!r}); use fewer shards or a wider filter")


@dataclass(frozen=True)
class _Cell:
    method: str
    ipc: int
    pipc: int
    seed: int


def _validate_reliability(s: Scenario) -> None:
    """The faults section (see edge_client/faults.py)."""
    src, fl = s.source, s.faults
    if not fl.clients:
        return
    if fl.mode not in FAULT_MODES:  # checked only when faults are injected
        raise fail(src, "faults.mode", f"is {fl.mode!r}; choose one of {', '.join(FAULT_MODES)}")
    for i, phase in enumerate(fl.phases):
        if phase not in FAULT_PHASES:
            raise fail(src, f"faults.phases[{i}]", f"is {phase!r}; choose one of {', '.join(FAULT_PHASES)}")
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
    scenario = build(Scenario, tree, "", source)
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


def apply_device_profile(scenario: Scenario, device_type: str) -> tuple[Scenario, dict[str, Any]]:
    """``scenario`` with every null setting of ``DEVICE_PROFILE`` set to ``device_type``'s value (the resolved
    scenario and the cell records then state the value used); returns it and the keys it filled in."""
    filled: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for dotted in DEVICE_PROFILE:
        section, key = dotted.split(".")
        current = sections.get(section, getattr(scenario, section))
        if getattr(current, key) is None:
            filled[dotted] = profile_value(dotted, None, device_type)
            sections[section] = dataclasses.replace(current, **{key: filled[dotted]})
    return dataclasses.replace(scenario, **sections), filled


def save_resolved(scenario: Scenario, run_dir: str | os.PathLike[str]) -> Path:
    """Write the fully resolved scenario (defaults filled in) next to the run's results."""
    header = f"# resolved from {scenario.source}\n"
    return atomic_write_text(Path(run_dir) / "scenario.resolved.yaml",
                             header + yaml.safe_dump(scenario.to_dict(), sort_keys=False), root=run_dir)


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
    "executor": "distill.executor",
    "ray-address": "distill.ray_address",
    "workers": "distill.workers",
    "cells": "distill.cells",
    "shard": "distill.shard",
}


# Run-config keys whose values are taken verbatim ('method=dm,dkkt_dm' is one filter, not a list).
VERBATIM_ALIASES = frozenset({"cells", "shard", "ray-address"})


def alias_value(alias: str, raw: Any) -> Any:
    """The scenario value of run-config key ``alias``."""
    return str(raw).strip() if alias in VERBATIM_ALIASES else _parse_override_value(raw)


def _parse_override_value(raw: Any) -> Any:
    """Run-config values arrive as TOML scalars; strings are read as YAML ('1,10' is a list)."""
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if "," in text and not text.startswith(("[", "{")):  # a flow list or mapping keeps its commas
        text = f"[{text}]"
    return safe_yaml_load(text)


def overrides_from_run_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """Collect scenario overrides from Flower's run-config: aliases plus `overrides` ('a.b=1;c=x')."""
    overrides: dict[str, Any] = {}
    for alias, dotted in RUN_CONFIG_ALIASES.items():
        raw = run_config.get(alias, "")
        if raw == "" or raw is None:
            continue
        overrides[dotted] = alias_value(alias, raw)
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

# Median seconds of one distillation iteration on one quiet core (bench/baseline_cpu.jsonl, distill_step.py:
# width 128, CIFAR-10 shape, real batch 256, 1 thread) at ipc 1 / 10 / 50, for the three kinds of loss: DM
# alone, the DKKT terms alone (dsv) and both (dkkt_dm). Other ipc: linear in between, the last slope beyond.
_ITER_SECONDS: dict[str, tuple[tuple[int, float], ...]] = {
    "dm": ((1, 0.113), (10, 0.638), (50, 1.41)),
    "dkkt": ((1, 0.159), (10, 1.55), (50, 8.88)),
    "dkkt_dm": ((1, 0.272), (10, 2.19), (50, 9.00)),
}
_SEC_PER_EVAL_EPOCH = 0.05  # one evaluation epoch of one model over <= 1 batch (bench/baseline_cpu.jsonl)


def _iteration_seconds(method: str, ipc: int) -> float:
    """Seconds of one iteration of ``method`` at ``ipc`` (0 for methods without gradient steps on S)."""
    if not optimizes(method):
        return 0.0
    terms = set(spec(method).terms)
    kind = "dm" if not terms & {"primal", "stat"} else ("dkkt_dm" if "dm" in terms else "dkkt")
    points = _ITER_SECONDS[kind]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if ipc <= x1 or (x1, y1) == points[-1]:
            return max(y0 + (y1 - y0) * (ipc - x0) / (x1 - x0), 0.0)
    return points[-1][1]


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
    repeats = len(s.distill.pipc) * len(s.distill.seeds or [0])  # cells of one (method, ipc)
    scale = (w / 128) ** 2
    seconds = 0.0
    for cell_ipc in s.distill.ipc:
        batches = -(-k * cell_ipc // s.evaluation.batch_size)
        evaluation = s.evaluation.num_models * s.evaluation.epochs * _SEC_PER_EVAL_EPOCH * batches
        for method in s.distill.methods:
            iteration = _iteration_seconds(method, cell_ipc) * s.distill.real_batch / 256
            seconds += repeats * scale * (s.distill.iterations * iteration + evaluation)
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
