"""The distillation grid's vocabulary, shared by the scenario schema and the server's sweep.

pipc "all": a scenario may list ``pipc: [10, 50, all]`` (or ``-1``). It means every client
uploads every image it holds (the paper's "all" column): the pool quota is the largest class
count and classes with fewer images are taken whole. Internally it is :data:`PIPC_ALL` (-1),
so comparisons and ``max`` stay integer arithmetic; files and tables say ``all``.

A cell (method, ipc, pipc) that cannot run is skipped with a reason instead of failing the
whole scenario: methods that need safe images at pipc 0, and methods that copy ipc real
images per class from a pool of pipc < ipc. Validation only rejects a method that has no
runnable cell at all.
"""

from __future__ import annotations

__all__ = ["PIPC_ALL", "NEEDS_SAFE", "normalize_pipc", "pipc_label", "real_init_methods", "static_skip_reason"]

from common.methods import REGISTRY

PIPC_ALL = -1
# Methods that read the safe pool T' (everything except model-only DSV extraction).
NEEDS_SAFE = frozenset(m for m, s in REGISTRY.items() if s.needs_safe)


def normalize_pipc(value: int | str) -> int:
    """``"all"`` / -1 -> :data:`PIPC_ALL`; an int >= 0 stays. Anything else raises ValueError."""
    if isinstance(value, str):
        if value.strip().lower() == "all":
            return PIPC_ALL
        raise ValueError(f"pipc must be an integer >= 0 or 'all', got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < PIPC_ALL:
        raise ValueError(f"pipc must be an integer >= 0 or 'all' (or -1), got {value!r}")
    return value


def pipc_label(pipc: int) -> str:
    """How a pipc appears in file names and tables: the number, or ``all``."""
    return "all" if pipc == PIPC_ALL else str(pipc)


def real_init_methods(init: str) -> frozenset[str]:
    """Methods that copy ipc real images per class out of the pool with this ``distill.init``."""
    return frozenset(m for m, s in REGISTRY.items()
                     if s.init == "real" or (s.init == "config" and not s.uses_dsvs and init == "real"))


def static_skip_reason(method: str, ipc: int, pipc: int, init: str) -> str | None:
    """Why the cell cannot run, judged from the scenario alone (None: it can).

    A pipc of "all" is judged at run time against the pool's real class counts.
    """
    if pipc == 0 and method in NEEDS_SAFE:
        return f"method '{method}' needs safe images but pipc is 0 (only 'dsv' runs from the model alone)"
    if pipc != PIPC_ALL and method in real_init_methods(init) and ipc > pipc:
        return (f"method '{method}' takes {ipc} real images per class from a pool of pipc={pipc}"
                + (" (distill.init is 'real')" if REGISTRY[method].init == "config" else ""))
    return None
