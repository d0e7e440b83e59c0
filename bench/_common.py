"""Shared helpers of the benchmark scripts: flags, device, timing, peak memory, JSON lines.

Every script prints one JSON object per line (``emit``); the first line of each script
is an ``env`` record (platform, CPU, torch, threads, device name).

Timing: ``interleave`` runs several variants round-robin (the order rotates each round)
so that load from other jobs on a shared machine hits all variants alike; it reports the
MEDIAN of the repeats per variant (the first ``warmup`` rounds are discarded). A ratio is
only ever computed from variants measured by the same ``interleave`` call.

Peak memory per variant: CPU: ``resource.getrusage`` peak RSS, reset before every call
by writing 5 to ``/proc/self/clear_refs`` (Linux >= 4.0; ``peak_scope`` says "call" when
that worked, "process" when the number is the process high-water mark). CUDA:
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. ``mem_before_mib``
is the RSS (CUDA: allocated bytes) when the call started. With the allocator setting of
common/perf.py on, freed memory stays resident, so a call's peak RSS also counts memory
that earlier calls freed but the process kept (the footprint, not the call's own need).

``--malloc on|off`` picks common/perf.py's allocator setting for the whole run; ``--threads``
the intra-op threads (default 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

# As server/app.py does before torch loads: passive OpenMP waiting, so that a loaded machine
# does not turn thread spin-waits into the measurement.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from common.device import pick_device  # noqa: E402

__all__ = ["ROOT", "add_common_args", "setup", "set_malloc", "env_record", "emit", "interleave", "Measured",
           "peak_reset", "peak_read", "rss_now_mib", "sync", "cifar_like", "cifar_meta"]


def add_common_args(p: argparse.ArgumentParser, repeats: int = 3, warmup: int = 1,
                    malloc: str = "on", threads: int = 1) -> argparse.ArgumentParser:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto: cuda if available)")
    p.add_argument("--repeats", type=int, default=repeats, help=f"timed repeats per variant (median; default {repeats})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed warm-up rounds (default {warmup})")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: a smoke run, not a measurement")
    p.add_argument("--threads", type=int, default=threads,
                   help=f"torch.set_num_threads (default {threads}; 0 = leave torch's default; "
                        "bench/threads.py measures 1 vs 2)")
    p.add_argument("--malloc", choices=("on", "off", "leave"), default=malloc,
                   help="common.perf.tune_cpu_allocator on / off (glibc default) for the whole run, or leave it "
                        f"to the production code (default {malloc}: what production does for this workload)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Threads, allocator setting, device; prints the env record."""
    if args.quick:
        args.repeats, args.warmup = 1, 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.malloc != "leave":
        set_malloc(args.malloc == "on")
    device = pick_device(args.device)
    emit(env_record(device, script=Path(sys.argv[0]).name, args=vars(args)))
    return device


def set_malloc(on: bool) -> None:
    """Switch common.perf's allocator setting; "off" also stops synthesize / evaluate from
    switching it back on (they call tune_cpu_allocator on the CPU)."""
    from common.perf import ENV_SWITCH, reset_cpu_allocator, tune_cpu_allocator

    if on:
        os.environ.pop(ENV_SWITCH, None)
        tune_cpu_allocator(force=True)
    else:
        os.environ[ENV_SWITCH] = "0"
        reset_cpu_allocator()


def rss_now_mib() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def env_record(device: torch.device, **extra: Any) -> dict[str, Any]:
    from common.perf import cpu_allocator_tuned

    rec: dict[str, Any] = {
        "kind": "env", "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": str(device),
        "malloc_tuned": cpu_allocator_tuned(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        rec["gpu"] = torch.cuda.get_device_name(device)
    rec.update(extra)
    return rec


def emit(record: Mapping[str, Any]) -> None:
    print(json.dumps(record, default=str), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> bool:
    """Reset the peak-memory counter; True when it is per call (not per process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM, which getrusage's ru_maxrss reports
        return True
    except OSError:
        return False


def peak_read(device: torch.device) -> float:
    """Peak memory in MiB: CUDA allocated bytes, or the CPU peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024.0


class Measured(dict):
    """name -> {"median_s", "times_s", "peak_mib", "peak_scope", ...}."""

    def median(self, name: str) -> float:
        return float(self[name]["median_s"])

    def ratio(self, a: str, b: str) -> float:
        """median(a) / median(b)."""
        return self.median(a) / self.median(b)


def interleave(variants: Mapping[str, Callable[[], float | None]], repeats: int, warmup: int,
               device: torch.device) -> Measured:
    """Run each variant ``warmup + repeats`` times, round-robin with rotating order.

    A variant returns None (its wall time is measured here) or its own measured seconds
    (e.g. one iteration out of a call that also does set-up). Returns per-variant medians.
    """
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, float] = {n: 0.0 for n in names}
    before: dict[str, float] = {n: 0.0 for n in names}
    scope = "call"
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            before[n] = rss_now_mib() if device.type == "cpu" else torch.cuda.memory_allocated(device) / 2**20
            per_call = peak_reset(device)
            scope = scope if per_call else "process"
            sync(device)
            t0 = time.perf_counter()
            own = variants[n]()
            sync(device)
            dt = time.perf_counter() - t0 if own is None else float(own)
            peaks[n] = max(peaks[n], peak_read(device))
            if r >= warmup:
                times[n].append(dt)
    out = Measured()
    for n in names:
        out[n] = {"median_s": statistics.median(times[n]), "times_s": [round(t, 4) for t in times[n]],
                  "peak_mib": round(peaks[n], 1), "mem_before_mib": round(before[n], 1), "peak_scope": scope,
                  "peak_kind": "cuda_max_allocated" if device.type == "cuda" else "rss"}
    return out


def cifar_like(n: int, num_classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalized CIFAR-10-shaped images, n // num_classes per class (class-major)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.arange(num_classes).repeat_interleave(max(1, n // num_classes))[:n]
    return x, y


def cifar_meta() -> Any:
    from common.datasets import get_meta

    return get_meta("cifar10")
