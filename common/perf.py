"""CPU performance switches shared by distillation, evaluation and the benchmarks.

Why this exists (measured, see bench/README.md): on the CPU, a ConvNet-3 forward/backward
allocates activation tensors of tens of MB (100 × 128 × 32 × 32 float32 = 52 MB). glibc
serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap``
and gives it back on ``free``, so each such tensor is page-faulted in again, page by
page, every time: a ReLU that computes in 5 ms took 37 ms. PyTorch has no caching
allocator on the CPU. ``tune_cpu_allocator`` tells glibc to serve large blocks from the
heap and to keep freed memory (``mallopt``): dkkt_dm iterations 1.7x, evaluation epochs
1.2-1.8x and client epochs 1.45x faster (same-process A/B, bench/fast_paths.py).
The price is a higher peak RSS (freed blocks stay mapped, the heap fragments), reported
by the benchmarks. Numerics are unaffected (only where memory comes from changes).

Process-wide and Linux/glibc only; elsewhere these functions do nothing and return False.
Opt out with the environment variable ``FEDPDD_MALLOC_TUNE=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_cpu_allocator", "reset_cpu_allocator", "cpu_allocator_tuned", "ENV_SWITCH"]

ENV_SWITCH = "FEDPDD_MALLOC_TUNE"

# glibc <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4

# Keep up to 1 GiB of freed memory at the top of the heap (default 128 KiB, dynamic).
_TRIM_KEEP = 1 << 30
# glibc's own ceilings of the dynamic thresholds (64-bit): what a long-running default
# process converges to; ``reset_cpu_allocator`` restores these.
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_MMAP_THRESHOLD_MAX = 32 << 20
_DEFAULT_TRIM_STEADY = 2 * _DEFAULT_MMAP_THRESHOLD_MAX

_state = {"tuned": False}


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  # glibc only (musl has no mallopt semantics we rely on)
        return libc
    except (OSError, AttributeError):
        return None


def tune_cpu_allocator(force: bool = False) -> bool:
    """Serve large allocations from the heap and keep freed memory (idempotent).

    Returns True when the setting is (now) active. Does nothing when ``FEDPDD_MALLOC_TUNE``
    is ``0`` (unless ``force``) or off Linux/glibc.
    """
    if _state["tuned"]:
        return True
    if not force and os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_KEEP))
    _state["tuned"] = ok
    return ok


def reset_cpu_allocator() -> bool:
    """Undo ``tune_cpu_allocator`` (mmap for large blocks again, trim freed memory).

    glibc's adaptive thresholds cannot be restored exactly once set, so this sets their
    steady-state ceilings (mmap above 32 MiB, trim above 64 MiB). Used by the benchmarks
    to compare both settings in one process.
    """
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_STEADY)
    libc.malloc_trim(0)
    _state["tuned"] = False
    return True


def cpu_allocator_tuned() -> bool:
    """Whether ``tune_cpu_allocator`` is active in this process."""
    return _state["tuned"]
