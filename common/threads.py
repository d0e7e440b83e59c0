"""One CPU thread policy for the whole process tree of a run (server + every client actor).

Why: on a small CPU every process used to take torch's default of one intra-op thread per
core, so the server and each Ray client actor each ran 2 threads on 2 cores, and any second
job made them all time-slice. Measured on 2 shared cores with a second CPU-bound job beside
it (bench/threads.py, ipc 1, pipc 10, same process, load average 1.5-1.8): 1 thread vs 2 is
0.97x the time for a dkkt_dm iteration, 1.00x for dm and 0.88x for an evaluation epoch, so a
second thread buys nothing there and costs when the CPU is shared. The policy:

- client actors: 1 thread each; Ray runs one actor per core (``num-cpus = 1`` per client), so
  the clients together fill the cores during the federated phases;
- the server: half the cores (1 on a 2-core machine, 8 on 16), leaving room for the client
  actors (they run while the server aggregates and evaluates) and for whatever else runs.

It is applied at the entry points (the ServerApp's main, each ClientApp handler, the
command-line tools), never at import time, so importing a module changes nothing. Override
with ``FEDPDD_THREADS`` (server side) and ``FEDPDD_CLIENT_THREADS`` (client actors); 0 leaves
torch's default.
"""

from __future__ import annotations

import os

from common.perf import tune_cpu_allocator

__all__ = ["ENV_SERVER", "ENV_CLIENT", "cpu_cores", "server_threads", "client_threads", "apply_thread_policy",
           "setup_process"]

ENV_SERVER = "FEDPDD_THREADS"
ENV_CLIENT = "FEDPDD_CLIENT_THREADS"


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, e.g. a container's CPU set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _from_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer (0 = torch's default)") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={raw!r} must be >= 0 (0 = torch's default)")
    return value


def server_threads() -> int:
    """Intra-op threads of the server process (0: leave torch's default)."""
    return _from_env(ENV_SERVER, max(1, cpu_cores() // 2))


def client_threads() -> int:
    """Intra-op threads of one client actor (0: leave torch's default)."""
    return _from_env(ENV_CLIENT, 1)


def apply_thread_policy(role: str) -> int:
    """Set torch's intra-op threads for ``role`` ('server', 'client', or 'worker': a sweep worker process,
    always 1 thread, since the workers together fill the cores, server/sweep/cell_pool.py); returns the
    count in use."""
    import torch

    if role not in ("server", "client", "worker"):
        raise ValueError(f"role must be 'server', 'client' or 'worker', got {role!r}")
    n = server_threads() if role == "server" else client_threads() if role == "client" else 1
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def setup_process(role: str) -> int:
    """The one runtime-setup step of an entry point (the ServerApp, each ClientApp handler, a sweep
    worker, the command-line tools): the thread policy above plus the allocator setting of
    ``common.perf.tune_cpu_allocator`` (bit-identical numbers; 1.45-1.7x faster CPU training and
    distillation; ``FEDPDD_MALLOC_TUNE=0`` opts out). Idempotent; returns the intra-op threads in use."""
    tune_cpu_allocator()
    return apply_thread_policy(role)
