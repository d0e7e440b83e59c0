"""Run one scenario several times with one federation key swept, then compare the runs.

Federation settings (Dirichlet alpha, number of clients, rounds, ...) decide theta* and the
safe pool, so unlike the distillation grid they cannot vary inside one run: each value is its
own run folder. Example (the non-IID study)::

    python scenarios/sweep_runs.py scenarios/non-iid.yaml \\
        --key federation.dirichlet_alpha --values 0.05,0.1,0.5,1,100

runs ``<out>/dirichlet_alpha-0.05``, ... (``<out>`` defaults to ``runs/<scenario name>``), each
in its own process through ``flwr.simulation.run_simulation`` with as many SuperNodes as
``federation.num_clients`` (the key may be that one: ``--key federation.num_clients --values
2,4,8``), and then ``python -m server.compare`` into ``<out>/compare``. A run folder that
finished earlier is resumed (its finished cells are read back). ``--dry-run`` prints the
equivalent ``flwr run`` commands instead. ``--set k=v`` adds fixed overrides to every run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.scenario import _parse_override_value, load_scenario  # noqa: E402


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for item in pairs:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_override_value(v)
    return out


def run_one(scenario_path: str, overrides: dict) -> Path:
    """One complete run in this process (Flower simulation); returns its run folder."""
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from flwr.simulation import run_simulation

    from edge_client.app import app as client_app
    from server.app import create_server_app

    scenario = load_scenario(scenario_path, overrides=overrides)
    clients = scenario.federation.num_clients or 4
    run_simulation(server_app=create_server_app(scenario), client_app=client_app, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    return scenario.run_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", help="base scenario YAML")
    p.add_argument("--key", help="dotted scenario key to sweep, e.g. federation.dirichlet_alpha")
    p.add_argument("--values", help="comma-separated values of --key")
    p.add_argument("--out", help="parent folder of the runs (default runs/<scenario name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed override for every run")
    p.add_argument("--dry-run", action="store_true", help="print the equivalent flwr commands, run nothing")
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # internal: one run, this process
    args = p.parse_args(argv)
    fixed = _overrides(args.set)
    if args.single:
        run_one(args.scenario, fixed)
        return 0
    if not args.key or not args.values:
        p.error("--key and --values are required")
    base = load_scenario(args.scenario, overrides=fixed)
    out = Path(args.out or f"runs/{base.name}").resolve()
    short = args.key.rsplit(".", 1)[-1]
    run_dirs = []
    for raw in args.values.split(","):
        value = _parse_override_value(raw)
        tag = f"{short}-{raw.strip()}"
        run_dir = out / tag
        ov = {**fixed, args.key: value, "name": f"{base.name}-{tag}", "output_dir": str(run_dir)}
        load_scenario(args.scenario, overrides=ov)  # fail before any run on a bad value
        if args.dry_run:
            cfg = ";".join(f"{k}={v}" for k, v in ov.items())
            n = ov.get("federation.num_clients", base.federation.num_clients) or 4
            print(f"flwr run . --stream --federation-config \"num-supernodes={n}\" "
                  f"--run-config \"scenario='{args.scenario}' overrides='{cfg}'\"")
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), args.scenario, "--single",
               *(f"--set={k}={v}" for k, v in ov.items())]
        print(f"[sweep_runs] {args.key}={raw.strip()} -> {run_dir}", flush=True)
        subprocess.run(cmd, cwd=Path.cwd(), check=True)  # one process per run: a fresh Ray and torch
        run_dirs.append(run_dir)
    if args.dry_run:
        print(f"python -m server.compare {' '.join(str(out / f'{short}-{v.strip()}') for v in args.values.split(','))} "
              f"--out {out / 'compare'}")
        return 0
    subprocess.run([sys.executable, "-m", "server.compare", *map(str, run_dirs), "--out", str(out / "compare")],
                   cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
