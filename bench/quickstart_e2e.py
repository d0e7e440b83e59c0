"""The quickstart end to end (wall time, peak RSS): ServerApp + ClientApps through
``flwr.simulation.run_simulation`` with FEDPDD_SCENARIO=scenarios/quickstart.yaml, as
tests/test_app_e2e.py drives the app. Takes minutes (about 5 on 2 busy CPU cores, README), so
bench/run_all.sh only runs it with --e2e.

The run writes to a temporary folder (``--output-dir``), not to runs/quickstart. Reported:
wall time, the phase timings of the run's timings.json, and three memory figures:
``peak_rss_self_mib`` (this process: the server side of the simulation),
``peak_rss_tree_mib`` (largest sum of RSS over this process and all its descendants, Ray
workers included, sampled every 0.5 s) and ``peak_rss_children_mib`` (getrusage
RUSAGE_CHILDREN: the largest reaped descendant).

    python bench/quickstart_e2e.py                 # the real quickstart (minutes)
    python bench/quickstart_e2e.py --quick         # 1 round, 5 iterations, 2 epochs: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

from _common import ROOT, add_common_args, emit, setup


def _tree_rss_mib(root_pid: int) -> float:
    """Sum of RSS over ``root_pid`` and its descendants (from /proc; no psutil needed)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            rss[int(entry)] = int(Path(f"/proc/{entry}/statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total / 2**20


class _TreeSampler(threading.Thread):
    def __init__(self, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.every_s, self.peak, self._stop_evt = every_s, 0.0, threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            try:
                self.peak = max(self.peak, _tree_rss_mib(os.getpid()))
            except OSError:
                pass
            self._stop_evt.wait(self.every_s)

    def stop(self) -> float:
        self._stop_evt.set()
        self.join()
        return self.peak


def main(argv: list[str] | None = None) -> None:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), repeats=1, warmup=0,
                        malloc="leave", threads=0)
    p.add_argument("--scenario", default=str(ROOT / "scenarios" / "quickstart.yaml"))
    p.add_argument("--output-dir", default=None, help="run folder (default: a new temporary folder)")
    args = p.parse_args(argv)
    quick = args.quick
    device = setup(args)  # --device is passed on to the scenario below

    from flwr.simulation import run_simulation

    from common.scenario import load_scenario
    from edge_client.app import app as client_app
    from server.app import create_server_app

    os.environ["FEDPDD_SCENARIO"] = args.scenario  # inherited by the simulation's workers
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="fedpdd-bench-e2e-"))
    overrides: dict[str, object] = {"output_dir": str(out), "device": str(device)}
    if quick:
        overrides.update({"federation.rounds": 1, "distill.iterations": 5, "evaluation.epochs": 2,
                          "evaluation.num_models": 2, "data.train_limit": 2000, "data.test_limit": 500})
    for r in range(max(1, args.repeats)):
        run_dir = out / f"run{r}" if args.repeats > 1 else out
        scenario = load_scenario(args.scenario, overrides={**overrides, "output_dir": str(run_dir)})
        sampler = _TreeSampler()
        sampler.start()
        t0 = time.perf_counter()
        run_simulation(
            server_app=create_server_app(scenario),
            client_app=client_app,
            num_supernodes=scenario.federation.num_clients,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
        wall = time.perf_counter() - t0
        tree_peak = sampler.stop()
        timings_file = run_dir / "timings.json"
        phases = json.loads(timings_file.read_text()) if timings_file.is_file() else None
        self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        emit({"kind": "quickstart_e2e", "scenario": args.scenario, "quick": quick, "repeat": r,
              "device": str(device), "wall_s": round(wall, 2), "phases_s": phases,
              "peak_rss_self_mib": round(self_peak, 1), "peak_rss_tree_mib": round(tree_peak, 1),
              "peak_rss_children_mib": round(child_peak, 1), "run_dir": str(run_dir),
              "results_ok": (run_dir / "results.md").is_file()})


if __name__ == "__main__":
    main()
