"""Check a scenario and its run-config before anything starts (a second or two, no torch work).

    python -m server.check [--run-config "rounds=3 ipc='1,10'"] [--num-supernodes 4] [--print-run-dir]
    python -m server.check --status FILE

The first form resolves what ``flwr run . --run-config "..."`` would run: the scenario YAML
(``scenario`` key, else the app default), every run-config override on top of it, and the
federation size. Every error names the key, the value and where it came from (the YAML file
or ``--run-config``) and the command exits 2; on success it prints a one-line summary (or,
with ``--print-run-dir``, only the run folder) and exits 0. ``scenarios/quickstart.sh`` and
``scenarios/deployment.sh`` run it first.

The second form reads the status file a ServerApp writes when ``FEDPDD_STATUS_FILE`` is set
(``flwr run`` itself exits 0 even when the app fails): exit 0 when the run finished, 1 with
the one-line reason last when it failed or never reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.common.config import parse_config_args

from common.scenario import (
    APP_DIR,
    DEFAULT_SCENARIO,
    RUN_CONFIG_ALIASES,
    Scenario,
    ScenarioError,
    _parse_override_value,
    alias_value,
    find_scenario_file,
    load_scenario,
)
from common.config import did_you_mean
from common.scenario import check_resources, estimate_resources
from common.atomic import atomic_write_text
from server.preflight import check_data_root

__all__ = ["ENV_STATUS", "app_config_keys", "parse_run_config", "resolve", "check_federation", "check", "grid_time_line",
           "merge_run_configs", "format_run_config",
           "write_status", "read_status", "main"]

ENV_STATUS = "FEDPDD_STATUS_FILE"
RUN_CONFIG = "--run-config"


def app_config_keys(project: Path = APP_DIR) -> dict[str, Any]:
    """The run-config keys the app declares (``[tool.flwr.app.config]`` of pyproject.toml) and their defaults."""
    with open(project / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


# Flower's own pattern for one 'key=value' token (flwr.common.config.parse_config_args): what it does not match
# it drops without a word, so a token without '=' is found here and refused.
_TOKEN = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def parse_run_config(texts: Sequence[str]) -> dict[str, Any]:
    """``--run-config`` strings as Flower parses them, with unknown keys and tokens without '=' rejected by name."""
    items: dict[str, Any] = {}
    for text in texts:
        leftover = _TOKEN.sub(" ", text).split()
        if leftover and not (len(texts) == 1 and text.strip().endswith(".toml")):
            raise ScenarioError(f"{RUN_CONFIG} {text!r}: {leftover[0]!r} is not key=value (Flower would drop it "
                                f"silently); write it as {leftover[0]}=VALUE, quoting strings: methods='dm,dkkt_dm'")
        try:
            items.update(parse_config_args([text]))
        except Exception as err:  # click.ClickException: Flower's own message, without the offending text
            raise ScenarioError(f"{RUN_CONFIG} {text!r} is not 'key=value key2=value2' (TOML values, quote "
                                f"strings: methods='dm,dkkt_dm'): {getattr(err, 'message', err)}") from None
    known = app_config_keys()
    for key, value in items.items():
        if key not in known:
            raise ScenarioError(
                f"{RUN_CONFIG}: unknown key '{key}' (value {value!r}){did_you_mean(key, known)}; valid keys: "
                f"{', '.join(known)}. Other scenario keys go through overrides='section.key=value;...'"
            )
    return items


def merge_run_configs(texts: Sequence[str]) -> dict[str, Any]:
    """Several ``--run-config`` strings as one: a later key replaces an earlier one, except ``overrides``,
    whose ``;``-separated items are joined (a later item for the same scenario key wins when applied)."""
    merged: dict[str, Any] = {}
    for text in texts:
        for key, value in parse_run_config([text]).items():
            if key == "overrides" and merged.get(key) and value:
                value = f"{str(merged[key]).rstrip(';')};{value}"
            merged[key] = value
    return merged


def format_run_config(items: dict[str, Any]) -> str:
    """``items`` as one ``--run-config`` string that Flower parses back to the same values."""
    parts = []
    for key, value in items.items():
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, (int, float)):
            text = repr(value)
        elif "'" not in str(value):
            text = f"'{value}'"
        elif '"' not in str(value):
            text = f'"{value}"'
        else:
            raise ScenarioError(f"{RUN_CONFIG} {key}: a value with both ' and \" cannot be passed on: {value!r}")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _origin(key: str, raw: Any) -> str:
    return f"{RUN_CONFIG} {key}={raw!r}"


def resolve(run_config: dict[str, Any]) -> Scenario:
    """The scenario ``run_config`` asks for; errors name the key, the value and their origin.

    Each override is first applied on its own to the YAML, so that a bad value is blamed on
    ``--run-config`` and not on the file; then all together (combinations).
    """
    path = str(run_config.get("scenario") or os.environ.get("FEDPDD_SCENARIO") or DEFAULT_SCENARIO)
    file = find_scenario_file(path)
    base = load_scenario(file)  # errors here are the file's: they name it
    singles: list[tuple[str, Any, str]] = []  # (dotted key, value, origin)
    for alias, dotted in RUN_CONFIG_ALIASES.items():
        raw = run_config.get(alias, "")
        if raw == "" or raw is None:
            continue
        try:
            singles.append((dotted, alias_value(alias, raw), _origin(alias, raw)))
        except Exception as err:  # yaml.YAMLError: the text is not a value
            raise ScenarioError(f"{_origin(alias, raw)}: cannot read the value: {err}") from None
    free_form = str(run_config.get("overrides", "") or "")
    for item in filter(None, (part.strip() for part in free_form.split(";"))):
        if "=" not in item:
            raise ScenarioError(f"{RUN_CONFIG} overrides: item {item!r} is not section.key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        try:
            singles.append((key, _parse_override_value(raw), f"{RUN_CONFIG} overrides '{key}={raw}'"))
        except Exception as err:
            raise ScenarioError(f"{RUN_CONFIG} overrides '{key}={raw}': cannot read the value: {err}") from None
    if not singles:
        return base
    try:  # all together: overrides may only be valid in combination (clients=2 with min_clients=2)
        return load_scenario(file, overrides={d: v for d, v, _ in singles})
    except ScenarioError as err:
        combined = err
    # Which one is to blame? The first override that fails on its own; the schema's message starts with
    # the file it was read from, but this value came from the command line.
    for dotted, value, origin in singles:
        try:
            load_scenario(file, overrides={dotted: value})
        except ScenarioError as err:
            msg = str(err).removeprefix(f"{file}: ")
            raise ScenarioError(f"{origin}: {msg} (scenario file {file})") from None
    msg = str(combined).removeprefix(f"{file}: ")
    given = ", ".join(o.removeprefix(f"{RUN_CONFIG} ") for _, _, o in singles)
    raise ScenarioError(f"{file} with {RUN_CONFIG} {given}: {msg}") from None


def check_federation(scenario: Scenario, num_supernodes: int | None, origin: str = "num-supernodes") -> None:
    """``federation.num_clients`` / ``min_clients`` against the federation's SuperNodes."""
    if num_supernodes is None:
        return
    f = scenario.federation
    if f.num_clients is not None and f.num_clients != num_supernodes:
        raise ScenarioError(
            f"{scenario.source}: key 'federation.num_clients' is {f.num_clients} but the federation has "
            f"{num_supernodes} SuperNodes ({origin}); set clients={num_supernodes} in {RUN_CONFIG}, change "
            "federation.num_clients, or set it to null to use every SuperNode"
        )
    if f.min_clients > num_supernodes:
        raise ScenarioError(
            f"{scenario.source}: key 'federation.min_clients' is {f.min_clients}, more than the federation's "
            f"{num_supernodes} SuperNodes ({origin}); lower it (overrides='federation.min_clients=...')"
        )


def check(run_config: dict[str, Any], num_supernodes: int | None = None) -> Scenario:
    """Everything that can be checked before a run starts: schema, overrides, federation size, data.root,
    the memory estimate (common.scenario.check_resources; its long-run warnings go to stderr)."""
    scenario = resolve(run_config)
    check_federation(scenario, num_supernodes)
    check_data_root(scenario)
    for warning in check_resources(scenario):
        print(f"fedpdd check: warning: {warning}", file=sys.stderr)
    return scenario


# ---------------------------------------------------------------- run status (flwr run exits 0 on failure)


def write_status(ok: bool, error: BaseException | None = None, run_dir: Path | None = None,
                 path: str | os.PathLike[str] | None = None) -> Path | None:
    """Record how the run ended in ``path`` (default: ``$FEDPDD_STATUS_FILE``; unset: nothing written)."""
    target = path or os.environ.get(ENV_STATUS)
    if not target:
        return None
    reason = "" if error is None else f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    record = {"ok": ok, "reason": reason, "run_dir": str(run_dir) if run_dir else None, "time": time.time()}
    return atomic_write_text(target, json.dumps(record) + "\n", root=Path(target).parent)


def read_status(path: str | os.PathLike[str]) -> tuple[bool, str]:
    """(ok, one-line reason) from a status file; a missing or unreadable file is a failure."""
    p = Path(path)
    if not p.is_file():
        return False, (f"the ServerApp never reported an outcome ({p} missing): it did not start or was killed; "
                       "see the log above")
    try:
        record = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return False, f"unreadable status file {p}: {err}"
    if record.get("ok"):
        return True, f"finished: results in {record.get('run_dir')}"
    return False, record.get("reason") or "failed (no reason recorded)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", action="append", default=[], metavar="'k=v ...'",
                        help="as for flwr run (repeatable)")
    parser.add_argument("--num-supernodes", type=int, default=None, help="SuperNodes of the federation to check against")
    parser.add_argument("--print-run-dir", action="store_true", help="print only the run folder")
    parser.add_argument("--print-run-config", action="store_true",
                        help="print only the --run-config strings merged into one (later keys win; overrides joined)")
    parser.add_argument("--print-data", action="store_true",
                        help="print only the data source: '<dataset> <data.root or -> <data.download>'")
    parser.add_argument("--status", metavar="FILE", help="report the outcome a ServerApp wrote to FILE")
    args = parser.parse_args(argv)
    if args.status:
        ok, reason = read_status(args.status)
        print(("fedpdd: " if ok else "fedpdd: run FAILED: ") + reason, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    try:
        run_config = merge_run_configs(args.run_config)
        scenario = check(run_config, args.num_supernodes)
        merged = format_run_config(run_config) if args.print_run_config else ""
    except ScenarioError as err:  # bad input: one line with the fix, exit 2 (as every fedpdd CLI)
        print(f"fedpdd check: {err}", file=sys.stderr)
        return 2
    if args.print_run_config:
        print(merged)
    elif args.print_run_dir:
        print(scenario.run_dir)
    elif args.print_data:
        data = scenario.data
        print(data.dataset, data.root or "-", str(data.download).lower())
    else:
        d, f = scenario.distill, scenario.federation
        print(f"fedpdd check: OK {scenario.name} ({scenario.source}): {f.num_clients or 'all'} clients, "
              f"{f.rounds} rounds, methods {','.join(d.methods)}, ipc {d.ipc}, pipc {d.pipc}, "
              f"seeds {d.seeds or [scenario.seed]} -> {scenario.run_dir}")
        print(f"fedpdd check: {grid_time_line(scenario)}")
    return 0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def grid_time_line(scenario: Scenario) -> str:
    """The grid's estimated CPU time (common.scenario.estimate_resources) as one line, with what it covers."""
    d = scenario.distill
    cells = len(d.methods) * len(d.ipc) * len(d.pipc) * len(d.seeds or [scenario.seed])
    seconds = estimate_resources(scenario)["cpu_seconds"]
    return (f"{cells} grid cells, estimated distill + evaluate CPU time about {_duration(seconds)} on one core "
            "at bench/baseline_cpu.jsonl's quiet-core rates (on 2 shared cores the quickstart's distill + evaluate "
            "took about 2x its estimate; federation not included)")


if __name__ == "__main__":
    raise SystemExit(main())
