"""How the cost of a run grows with the federation: the quickstart scenario with more clients.

Configurations (same total data: ``data.train_limit`` pinned at 6,000 images in ``BUDGET``, so
more clients each hold less):

- Simulation Engine: ``flwr.simulation.run_simulation`` (as bench/quickstart_e2e.py and
  tests/test_app_e2e.py drive the app) with 4, 16 and 64 simulated clients, one CPU per
  client actor (on 2 cores Ray runs 2 actors at a time, as ``scenarios/quickstart.sh``).
- Deployment Engine: one ``flower-superlink`` and 2 or 4 ``flower-supernode`` processes on
  loopback (each holds its partition via ``--node-config``), ``flwr run . <connection>``
  against them, as ``scenarios/deployment.sh`` does; private ``FLWR_HOME``, free ports.

Every configuration runs in processes of its own, started here and stopped by process group
id (their own sessions), also on failure or Ctrl-C. Reported per configuration, one JSON line:

- ``timings_s``: the run folder's ``timings.json`` as the ServerApp wrote it; ``phases_s``:
  the same made disjoint (federate, collect, distill+evaluate, audit, report_rest = report
  minus the audit inside it) plus ``other`` = wall time minus their sum (engine start-up,
  data loading before phase 1, shut-down);
- ``peak_rss_server_mib``: the ServerApp's process (simulation: the driver process, which
  runs the ServerApp in a thread; deployment: ``flwr-serverapp``), its own high-water mark
  (``VmHWM``);
- ``peak_rss_tree_mib``: the largest sum of RSS over every process started for the
  configuration and its descendants (Ray's GCS, raylet and workers; SuperLink, SuperNodes,
  ClientApp processes), sampled every 0.5 s (shared memory, e.g. Ray's object store, counts
  once per process that maps it);
- ``peak_rss_client_mib``: the largest ``VmHWM`` of a client-side process (Ray worker or
  ``flwr-clientapp``);
- ``loadavg_1m_start`` / ``_end``: the machine's load average (absolute times on a shared
  machine move with it).

The distillation / evaluation budget does not depend on the number of clients, so it is cut
to ``BUDGET`` (the same for every configuration) to spend the time on what scales.

    python bench/clients_scaling.py                       # all five configurations (~15-25 min)
    python bench/clients_scaling.py --sim 4,16 --deploy ""  # a subset
    python bench/clients_scaling.py --quick --sim 4 --deploy 2   # smoke run, numbers mean nothing
    python bench/clients_scaling.py --render bench/clients_scaling.jsonl   # table + plot only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "quickstart.yaml"
KIND = "clients_scaling"
PHASES = ("federate", "collect", "distill+evaluate", "audit", "report_rest", "other")
EXTRAPOLATE_TO = 1000

# What does not scale with the clients, cut the same for every configuration (dotted scenario keys).
BUDGET: dict[str, Any] = {
    "data.train_limit": 6000,  # pinned: the quickstart's own budget may change (it is 4,000 now)
    "distill.methods": ["dm"],
    "distill.seeds": [0],
    "distill.iterations": 20,
    "evaluation.epochs": 5,
    "evaluation.num_models": 1,
}
# --quick: a smoke run of the machinery (1 round, fewer images)
QUICK: dict[str, Any] = {"federation.rounds": 1, "distill.iterations": 2, "evaluation.epochs": 1,
                         "data.train_limit": 1000, "data.test_limit": 200, "privacy.audit_reference": 50}

__all__ = ["BUDGET", "PHASES", "read_timings", "split_phases", "read_phases", "fit_power_law", "markdown_table", "plot", "main"]


# ---------------------------------------------------------------- reading a run folder

def read_timings(run_dir: Path) -> dict[str, float] | None:
    """``run_dir/timings.json`` as written by the ServerApp (None when the run wrote none)."""
    path = Path(run_dir) / "timings.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object of phase -> seconds, got {type(raw).__name__}")
    return {str(k): float(v) for k, v in raw.items()}


def split_phases(timings: Mapping[str, float], wall_s: float | None = None) -> dict[str, float]:
    """Disjoint phases from timings.json: ``report`` there includes ``audit`` (server/pipeline.py
    times the whole phase 5, server/privacy_report.py the audit inside it), so ``report_rest`` is
    report minus audit; ``other`` = ``wall_s`` minus the phases (engine start-up, data loading
    before phase 1, shut-down)."""
    phases = dict(timings)
    if "report" in phases:
        phases["report_rest"] = max(0.0, phases.pop("report") - phases.get("audit", 0.0))
    if wall_s is not None:
        phases["other"] = max(0.0, wall_s - sum(phases.values()))
    return {k: round(v, 3) for k, v in phases.items()}


def read_phases(run_dir: Path, wall_s: float | None = None) -> dict[str, float] | None:
    """Disjoint seconds per phase of a run folder (:func:`split_phases` of its timings.json)."""
    timings = read_timings(run_dir)
    return None if timings is None else split_phases(timings, wall_s)


# ---------------------------------------------------------------- memory of a process tree

def _proc_table() -> dict[int, tuple[int, int, int, str]]:
    """pid -> (ppid, VmRSS KiB, VmHWM KiB, command line) from /proc (no psutil needed)."""
    table: dict[int, tuple[int, int, int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = rss = hwm = 0
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("PPid:"):
                    ppid = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (ppid, rss, hwm, cmd)
    return table


def _descendants(table: Mapping[int, tuple[int, int, int, str]], roots: Iterable[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    stack = [r for r in roots if r in table]
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            stack.extend(children.get(pid, []))
    return seen


class TreeSampler(threading.Thread):
    """Samples the process trees under ``roots`` every ``every_s``: the largest RSS sum, and each
    process's own high-water mark with its command line (the last value seen before it exited)."""

    def __init__(self, roots: Sequence[int] = (), every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.roots, self.every_s = list(roots), every_s
        self.peak_tree_kib, self.max_procs = 0, 0
        self.hwm: dict[int, tuple[int, str]] = {}
        self._stop_evt = threading.Event()

    def sample(self) -> None:
        table = _proc_table()
        pids = _descendants(table, self.roots)
        self.peak_tree_kib = max(self.peak_tree_kib, sum(table[p][1] for p in pids))
        self.max_procs = max(self.max_procs, len(pids))
        for p in pids:
            hwm, cmd = self.hwm.get(p, (0, ""))
            self.hwm[p] = (max(hwm, table[p][2]), table[p][3] or cmd)  # an exiting process has no cmdline

    def run(self) -> None:
        while not self._stop_evt.is_set():
            self.sample()
            self._stop_evt.wait(self.every_s)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join()

    def peak_mib(self, *needles: str, exclude: Sequence[int] = ()) -> float | None:
        """Largest VmHWM of a sampled process whose command line holds one of ``needles``."""
        vals = [h for p, (h, cmd) in self.hwm.items() if p not in exclude and any(n in cmd for n in needles)]
        return round(max(vals) / 1024, 1) if vals else None

    def top(self, k: int = 8) -> list[list[Any]]:
        """The ``k`` processes with the largest VmHWM: [MiB, command line (shortened)]."""
        rows = sorted(self.hwm.values(), reverse=True)[:k]
        return [[round(h / 1024, 1), " ".join(Path(w).name if i == 0 else w for i, w in enumerate(cmd.split()))[:90]]
                for h, cmd in rows]


# ---------------------------------------------------------------- running one configuration

def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a process started here with start_new_session=True, and its group (by its id)."""
    if proc.poll() is None or _group_alive(proc.pid):
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(proc.pid):
                time.sleep(0.2)
            if not _group_alive(proc.pid):
                break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _env(flwr_home: Path | None = None, status: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # offline: no `uv sync`
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    if status is not None:
        env["FEDPDD_STATUS_FILE"] = str(status)
    return env


def _overrides(clients: int, run_dir: Path, quick: bool) -> dict[str, Any]:
    return {**BUDGET, **(QUICK if quick else {}), "federation.num_clients": clients,
            "federation.min_clients": clients, "output_dir": str(run_dir)}


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-600:]


def _sim_worker(clients: int, run_dir: Path, overrides_json: str) -> None:
    """In a child process: one simulation run; prints its own peak RSS as the last line."""
    import resource

    from flwr.simulation import run_simulation

    from common.scenario import load_scenario
    from edge_client.app import app as client_app
    from server.app import create_server_app

    os.environ["FEDPDD_SCENARIO"] = str(SCENARIO)  # inherited by the simulation's workers
    scenario = load_scenario(SCENARIO, overrides=json.loads(overrides_json))
    run_simulation(server_app=create_server_app(scenario), client_app=client_app, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    print(json.dumps({"self_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def run_simulation_config(clients: int, work: Path, quick: bool, timeout_s: float) -> dict[str, Any]:
    run_dir = work / f"sim-{clients}" / "run"
    log = work / f"sim-{clients}" / "driver.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    status = run_dir.parent / "status.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_sim-worker", str(clients), "--_run-dir", str(run_dir),
           "--_overrides", json.dumps(_overrides(clients, run_dir, quick))]
    rec: dict[str, Any] = {"engine": "simulation", "clients": clients}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(status=status), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    sampler = TreeSampler([proc.pid])
    sampler.start()
    try:
        proc.wait(timeout=timeout_s)
        rc, timed_out = proc.returncode, False
    except subprocess.TimeoutExpired:
        rc, timed_out = None, True
    finally:
        wall = time.perf_counter() - t0
        sampler.sample()
        sampler.stop()
        _stop_group(proc)  # Ray's processes live in the driver's session
    rec["wall_s"] = round(wall, 2)
    rec.update(_outcome(status, run_dir, rc, timed_out, timeout_s, log))
    last = _tail(log, 1)
    self_peak = json.loads(last)["self_peak_mib"] if last.startswith("{") else None
    rec["peak_rss_server_mib"] = round(self_peak, 1) if self_peak else sampler.peak_mib("_sim-worker")
    rec["peak_rss_tree_mib"] = round(sampler.peak_tree_kib / 1024, 1)
    rec["peak_rss_client_mib"] = sampler.peak_mib("ray::", "default_worker.py", exclude=[proc.pid])
    rec["processes_max"] = sampler.max_procs
    rec["top_processes_mib"] = sampler.top()
    rec["timings_s"] = read_timings(run_dir)
    rec["phases_s"] = read_phases(run_dir, wall)
    rec["log"] = str(log)
    return rec


def _outcome(status: Path, run_dir: Path, rc: int | None, timed_out: bool, timeout_s: float,
             log: Path) -> dict[str, Any]:
    if timed_out:
        return {"ok": False, "error": f"timed out after {timeout_s:.0f}s (stopped); log: {_tail(log)}"}
    try:
        st = json.loads(status.read_text())
    except (OSError, json.JSONDecodeError):
        st = None
    if st is not None and not st.get("ok"):
        return {"ok": False, "error": f"ServerApp failed: {st.get('reason')}"}
    if rc not in (0, None) or st is None or not (run_dir / "timings.json").is_file():
        return {"ok": False, "error": f"exit status {rc}, status file {'present' if st else 'missing'}; "
                                      f"log: {_tail(log)}"}
    return {"ok": True}


def _wait_health(port: int, wait_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited during start-up (status {proc.returncode})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the SuperLink did not answer on 127.0.0.1:{port} within {wait_s:.0f}s")


def run_deployment_config(nodes: int, work: Path, quick: bool, timeout_s: float) -> dict[str, Any]:
    base = work / f"deploy-{nodes}"
    run_dir, logs = base / "run", base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    flwr_home = Path(tempfile.mkdtemp(prefix="fedpdd-flwr-", dir=base))  # private: ~/.flwr untouched
    status = flwr_home / "status.json"
    port, *node_ports = _free_ports(1 + nodes)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = _env(flwr_home, status)
    bin_dir = Path(sys.executable).parent
    overrides = _overrides(nodes, run_dir, quick)
    run_config = "overrides='" + ";".join(f"{k}={_toml_free(v)}" for k, v in overrides.items()) + "'"
    rec: dict[str, Any] = {"engine": "deployment", "clients": nodes}
    procs: list[subprocess.Popen] = []
    sampler = TreeSampler()
    t0 = time.perf_counter()
    rc: int | None = None
    timed_out = False
    flwr_log = logs / "flwr-run.log"
    try:
        with open(logs / "superlink.log", "w") as fh:
            procs.append(subprocess.Popen([str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                           "--port", str(port)], cwd=ROOT, env=env, stdout=fh,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        sampler.roots.append(procs[0].pid)
        sampler.start()
        _wait_health(port, 120, procs[0])
        for i, nport in enumerate(node_ports):
            with open(logs / f"supernode-{i}.log", "w") as fh:
                procs.append(subprocess.Popen(
                    [str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                     "--host", "127.0.0.1", "--port", str(nport),
                     "--node-config", f"partition-id={i} num-partitions={nodes}"],
                    cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True))
            sampler.roots.append(procs[-1].pid)
        with open(flwr_log, "w") as fh:  # the ServerApp waits for the SuperNodes (server.federate.wait_for_nodes)
            procs.append(subprocess.Popen([str(bin_dir / "flwr"), "run", ".", "bench", "--stream",
                                           "--run-config", run_config], cwd=ROOT, env=env, stdout=fh,
                                          stderr=subprocess.STDOUT, start_new_session=True))
            sampler.roots.append(procs[-1].pid)
        try:
            rc = procs[-1].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
    except RuntimeError as err:
        rec.update(ok=False, error=str(err))
    finally:
        wall = time.perf_counter() - t0
        if sampler.is_alive():
            sampler.sample()
            sampler.stop()
        for p in reversed(procs):
            _stop_group(p)
    rec["wall_s"] = round(wall, 2)
    if "ok" not in rec:
        rec.update(_outcome(status, run_dir, rc, timed_out, timeout_s, flwr_log))
    rec["peak_rss_server_mib"] = sampler.peak_mib("flwr-serverapp")
    rec["peak_rss_tree_mib"] = round(sampler.peak_tree_kib / 1024, 1)
    rec["peak_rss_client_mib"] = sampler.peak_mib("flwr-clientapp")
    rec["processes_max"] = sampler.max_procs
    rec["top_processes_mib"] = sampler.top()
    rec["timings_s"] = read_timings(run_dir)
    rec["phases_s"] = read_phases(run_dir, wall)
    rec["log"] = str(logs)
    shutil.rmtree(flwr_home, ignore_errors=True)
    return rec


def _toml_free(v: Any) -> str:
    """An override value as the run-config's overrides string reads it back (YAML)."""
    if isinstance(v, list):
        return "[" + ",".join(str(x) for x in v) + "]"
    return str(v)


# ---------------------------------------------------------------- analysis and output

def fit_power_law(ns: Sequence[float], ts: Sequence[float]) -> tuple[float, float] | None:
    """Least-squares fit of t = a * n**b in log-log space; (a, b), or None with < 2 usable points."""
    pts = [(math.log(n), math.log(t)) for n, t in zip(ns, ts) if n > 0 and t > 0]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return math.exp(my - b * mx), b


def _ok(records: Iterable[Mapping[str, Any]], engine: str) -> list[Mapping[str, Any]]:
    return sorted((r for r in records if r.get("engine") == engine and r.get("ok") and r.get("phases_s")),
                  key=lambda r: r["clients"])


def extrapolate(records: Sequence[Mapping[str, Any]], engine: str = "simulation", n: int = EXTRAPOLATE_TO,
                last: int | None = None) -> dict[str, dict[str, float]]:
    """Per phase (and wall time): fitted exponent b and t(n) = a * n**b from the engine's successful
    runs; ``last``: fit only the runs with the ``last`` largest client counts (the latest regime)."""
    ok = _ok(records, engine)
    ok = ok[-last:] if last else ok
    out: dict[str, dict[str, float]] = {}
    series = {ph: [(r["clients"], r["phases_s"].get(ph, 0.0)) for r in ok] for ph in PHASES}
    series["wall"] = [(r["clients"], r["wall_s"]) for r in ok]
    for name, pts in series.items():
        fit = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        if fit is not None:
            out[name] = {"a": fit[0], "b": round(fit[1], 3), "at_n_s": round(fit[0] * n ** fit[1], 1)}
    return out


def _fmt(v: Any, nd: int = 1) -> str:
    return "-" if v is None else f"{v:,.{nd}f}"


def markdown_table(records: Sequence[Mapping[str, Any]]) -> str:
    head = ("| engine | clients | ok | wall s | " + " | ".join(PHASES) +
            " | peak RSS server MiB | peak RSS tree MiB | peak RSS client proc MiB | procs | load 1m start/end |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(records, key=lambda r: (r.get("engine") != "simulation", r.get("clients", 0))):
        ph = r.get("phases_s") or {}
        ok = "yes" if r.get("ok") else f"**no**: {r.get('error', '')[:160]}"
        lines.append(f"| {r.get('engine')} | {r.get('clients')} | {ok} | {_fmt(r.get('wall_s'))} | "
                     + " | ".join(_fmt(ph.get(p)) for p in PHASES)
                     + f" | {_fmt(r.get('peak_rss_server_mib'), 0)} | {_fmt(r.get('peak_rss_tree_mib'), 0)}"
                     f" | {_fmt(r.get('peak_rss_client_mib'), 0)} | {r.get('processes_max', '-')}"
                     f" | {_fmt(r.get('loadavg_1m_start'))} / {_fmt(r.get('loadavg_1m_end'))} |")
    ext, tail = extrapolate(records), extrapolate(records, last=2)
    if ext:
        ns = [r["clients"] for r in _ok(records, "simulation")]
        lines += ["", f"Power law t = a * n^b fitted per phase over the simulation runs, **extrapolated** to "
                      f"n = {EXTRAPOLATE_TO:,} clients (an extrapolation, not a measurement): over all runs "
                      f"(n = {', '.join(map(str, ns))}) and over the two largest (n = "
                      f"{', '.join(map(str, ns[-2:]))}: the local slope where the runs end).", "",
                  "| phase | b, all runs | t(1,000) s, all runs | b, two largest | t(1,000) s, two largest |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['b']:.2f} | {v['at_n_s']:,.0f} | {tail[k]['b']:.2f} | {tail[k]['at_n_s']:,.0f} |"
                  for k, v in ext.items() if k in tail]
    sim = [r for r in _ok(records, "simulation") if r.get("peak_rss_server_mib")]
    mem = {key: fit_linear([r["clients"] for r in sim], [r[key] for r in sim])
           for key in ("peak_rss_server_mib", "peak_rss_tree_mib")} if sim else {}
    if all(mem.values()) and mem:
        lines += ["", f"Peak memory, fitted linearly (c + s * n) over the simulation runs and **extrapolated** to "
                      f"n = {EXTRAPOLATE_TO:,} (an extrapolation):", "",
                  "| memory | MiB per extra client | at 1,000 clients MiB, extrapolated |", "|---|---|---|"]
        lines += [f"| {key.replace('peak_rss_', '').replace('_mib', '')} | {s:.2f} | "
                  f"{c + s * EXTRAPOLATE_TO:,.0f} |" for key, (c, s) in mem.items()]
    return "\n".join(lines) + "\n"


def plot(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Log-log plot: seconds per phase vs clients, one line per phase (simulation solid,
    deployment dashed), with the power law through the two largest simulation runs extended to
    1,000 clients (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ext = extrapolate(records, last=2)  # the local slope where the runs end
    for i, ph in enumerate(PHASES):
        c = colors[i % len(colors)]
        for engine, style, marker in (("simulation", "-", "o"), ("deployment", "--", "s")):
            pts = [(r["clients"], r["phases_s"][ph]) for r in _ok(records, engine) if r["phases_s"].get(ph, 0) > 0]
            if pts:
                ax.plot(*zip(*pts), style, marker=marker, color=c,
                        label=f"{ph} ({engine})" if engine == "deployment" else ph)
        if ph in ext:
            sim = _ok(records, "simulation")
            n0 = sim[-1]["clients"]
            xs = [n0, EXTRAPOLATE_TO]
            ax.plot(xs, [ext[ph]["a"] * x ** ext[ph]["b"] for x in xs], ":", color=c, alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients (simulated clients or SuperNodes; same 6,000 training images in total)")
    ax.set_ylabel("wall time of the phase (s)")
    ax.set_title("fedpdd quickstart on 2 shared CPU cores: time per phase vs clients\n"
                 "solid: simulation, dashed: deployment;\n"
                 "dotted: EXTRAPOLATION (power law through the two largest simulation runs)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rephase(rec: dict[str, Any]) -> dict[str, Any]:
    """Disjoint phases of a stored record from its raw timings (records written before
    ``timings_s`` existed hold the raw timings.json in ``phases_s``, plus ``other``)."""
    raw = rec.get("timings_s") or {k: v for k, v in (rec.get("phases_s") or {}).items() if k != "other"}
    if raw:
        rec = {**rec, "timings_s": raw, "phases_s": split_phases(raw, rec.get("wall_s"))}
    return rec


def fit_linear(ns: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """Least-squares y = c + s * n; (c, s), or None with < 2 distinct n."""
    if len(set(ns)) < 2:
        return None
    mx, my = sum(ns) / len(ns), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(ns, ys)) / sum((x - mx) ** 2 for x in ns)
    return my - slope * mx, slope


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sim", default="4,16,64", help="simulated client counts (default 4,16,64; '' for none)")
    p.add_argument("--deploy", default="2,4", help="SuperNode counts for the Deployment Engine (default 2,4)")
    p.add_argument("--quick", action="store_true", help="1 round, tiny budget: a smoke run, not a measurement")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration (default 900)")
    p.add_argument("--work-dir", default=None, help="run folders and logs (default: a new temporary folder)")
    p.add_argument("--jsonl", default=None, help="also append the records to this file")
    p.add_argument("--md", default=None, help="write the markdown table here (e.g. bench/clients_scaling.md)")
    p.add_argument("--png", default=None, help="write the log-log plot here (e.g. bench/img/clients_scaling.png)")
    p.add_argument("--render", default=None, metavar="JSONL", help="only render --md/--png from these records")
    p.add_argument("--_sim-worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_run-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_overrides", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._sim_worker is not None:
        _sim_worker(args._sim_worker, Path(args._run_dir), args._overrides)
        return

    if args.render:
        records = [_rephase(r) for r in map(json.loads, Path(args.render).read_text().splitlines())
                   if r.get("kind") == KIND]
    else:
        import platform

        records = []
        work = Path(args.work_dir or tempfile.mkdtemp(prefix="fedpdd-bench-scaling-"))
        print(json.dumps({"kind": "env", "script": Path(__file__).name, "platform": platform.platform(),
                          "python": platform.python_version(), "cpu_count": os.cpu_count(), "quick": args.quick,
                          "budget": BUDGET, "scenario": str(SCENARIO.relative_to(ROOT)), "work_dir": str(work)}),
              flush=True)
        plan = [("simulation", n) for n in _ints(args.sim)] + [("deployment", n) for n in _ints(args.deploy)]
        for engine, n in plan:
            load0 = os.getloadavg()[0]
            run = run_simulation_config if engine == "simulation" else run_deployment_config
            rec = {"kind": KIND, **run(n, work, args.quick, args.timeout), "quick": args.quick,
                   "loadavg_1m_start": round(load0, 2), "loadavg_1m_end": round(os.getloadavg()[0], 2)}
            print(json.dumps(rec), flush=True)
            records.append(rec)
            if args.jsonl:
                with open(args.jsonl, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
    if args.md:
        Path(args.md).write_text(markdown_table(records))
    if args.png:
        plot(records, Path(args.png))


if __name__ == "__main__":
    main()
