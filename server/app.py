"""Flower ServerApp: read the scenario, run its five phases (server.run.run_scenario).

Which scenario runs: ``run_config["scenario"]`` (``flwr run . --run-config
"scenario='scenarios/x.yaml'"``), else ``$FEDPDD_SCENARIO``, else the default scenario;
run-config override keys apply on top (server.check.resolve: an error names the key, the value
and whether it came from the file or --run-config). ``flwr.simulation.run_simulation`` passes
an empty run_config, so in-process runs either set ``$FEDPDD_SCENARIO`` or build their own app
with :func:`create_server_app(scenario)`.

Before anything else it compares the connected SuperNodes with ``federation.num_clients`` /
``min_clients`` (server.federation.federate.wait_for_nodes): in a simulation a mismatch fails in
seconds with the ``--federation-config "num-supernodes=N"`` to use.

The entry point also sets the thread policy (common.threads), replaces the scenario JSON in
Flower's log lines with a short fingerprint (common.progress), and writes the outcome to
``$FEDPDD_STATUS_FILE`` when set, because ``flwr run`` exits 0 even when the app raises
(``python -m server.check --status FILE`` turns it into an exit status).
"""

from __future__ import annotations

import os

# Before torch loads: libgomp's default busy-waiting makes torch 5-25x slower when the CPU is
# oversubscribed (server + simulated clients + anything else on a few cores). Override by exporting it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.progress import install_scenario_filter, scenario_fingerprint
from common.scenario import Scenario, load_scenario
from common.threads import cpu_cores, setup_process
from server.check import resolve, write_status
from server.federation.federate import wait_for_nodes
from server.run import run_scenario

__all__ = ["app", "create_server_app"]


def create_server_app(scenario: Scenario | str | Path | None = None) -> ServerApp:
    """A ServerApp bound to ``scenario`` (object or YAML path); None: resolve from the run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        threads = setup_process("server")  # the entry point of the server process (common/threads.py)
        resolved: Scenario | None = None
        try:
            if isinstance(scenario, Scenario):
                resolved = scenario
            elif scenario is not None:
                resolved = load_scenario(scenario)
            else:  # errors name the key, the value and whether it came from the YAML or --run-config
                resolved = resolve(dict(context.run_config))
            install_scenario_filter(resolved.to_json(), resolved.name)  # no 2 KB scenario dumps in log lines
            log(INFO, "fedpdd: %s, %d torch thread(s) on %d core(s)",
                scenario_fingerprint(resolved.to_json(), resolved.name), threads, cpu_cores())
            if not resolved.reuse_artifacts:  # the SuperNodes against the scenario, before any data or folder
                f = resolved.federation
                wait_for_nodes(grid, f.num_clients, f.min_clients, source=resolved.source)
            run_dir = run_scenario(grid, resolved)
        except BaseException as err:
            # `flwr run` exits 0 whatever the app does: leave the outcome where scripts can read it
            write_status(False, err, resolved.run_dir if resolved is not None else None)
            log(ERROR, "fedpdd run FAILED: %s: %s", type(err).__name__, str(err).strip().splitlines()[0] if str(err).strip() else "")
            raise
        write_status(True, run_dir=run_dir)

    return server_app


app = create_server_app()
