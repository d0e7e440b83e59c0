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

__all__ = ["PIPC_ALL", "NEEDS_SAFE", "CELL_KEYS", "normalize_pipc", "pipc_label", "real_init_methods",
           "static_skip_reason", "parse_cell_filter", "parse_shard", "select_cells"]

from collections.abc import Sequence
from typing import Any

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


# ---------------------------------------------------------------- a part of the grid (shards that merge)

CELL_KEYS = ("method", "ipc", "pipc", "seed")


def parse_cell_filter(text: str) -> dict[str, frozenset]:
    """``'ipc=10; method=dm,dkkt_dm'`` -> ``{'ipc': {10}, 'method': {'dm', 'dkkt_dm'}}`` (ValueError names the item).

    Items are separated by ``;`` (or spaces), values by ``,``; a cell matches when it matches every item.
    """
    out: dict[str, frozenset] = {}
    for item in text.replace(";", " ").split():
        key, sep, raw = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in CELL_KEYS or not raw.strip(","):
            raise ValueError(f"item {item!r} is not key=value[,value] with key one of {', '.join(CELL_KEYS)}")
        values: set = set()
        for v in filter(None, (v.strip() for v in raw.split(","))):
            if key == "method":
                values.add(v)
            else:
                try:
                    values.add(normalize_pipc(v) if key == "pipc" else int(v))
                except ValueError:
                    raise ValueError(f"item {item!r}: {v!r} is not {'an integer or all' if key == 'pipc' else 'an integer'}") from None
        if key in out:
            raise ValueError(f"item {item!r}: '{key}' is given twice")
        out[key] = frozenset(values)
    if not out:
        raise ValueError(f"{text!r} names no cells (write e.g. 'ipc=10' or 'method=dm,dkkt_dm; pipc=50')")
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """``'2/3'`` -> (2, 3): shard k of N, 1 <= k <= N."""
    k, sep, n = str(text).partition("/")
    try:
        k_i, n_i = int(k), int(n)
    except ValueError:
        k_i = n_i = 0
    if not sep or not 1 <= k_i <= n_i:
        raise ValueError(f"{text!r} is not k/N with 1 <= k <= N (e.g. 1/2)")
    return k_i, n_i


def _linked(methods: Sequence[str]) -> bool:
    """True when cells of one (pipc, ipc, seed) share a 'dsv' set (a DSV-combining method beside 'dsv')."""
    return "dsv" in methods and any(REGISTRY[m].uses_dsvs for m in methods)


def select_cells(specs: Sequence[Any], methods: Sequence[str], cells: str | None, shard: str | None) -> list[Any]:
    """The cells of ``specs`` (grid order; each with method/ipc/pipc/seed) that ``cells`` and ``shard`` select.

    The unit is one cell, or, when the grid combines DSVs (blend, dm_from_dsv beside dsv), all cells of one
    (pipc, ipc, seed), since they reuse that group's dsv set: a unit is selected when any of its cells matches
    the filter, and shard k of N takes every N-th unit of the filtered grid, starting at the k-th. The shards
    1/N ... N/N together hold every cell once.
    """
    if not cells and not shard:
        return list(specs)
    wanted = parse_cell_filter(cells) if cells else {}
    units: dict[tuple, list[Any]] = {}
    for spec in specs:
        key = (spec.pipc, spec.ipc, spec.seed) if _linked(methods) else (spec.pipc, spec.ipc, spec.seed, spec.method)
        units.setdefault(key, []).append(spec)
    chosen = [u for u in units.values()
              if any(all(getattr(s, k) in v for k, v in wanted.items()) for s in u)]
    if shard:
        k, n = parse_shard(shard)
        chosen = chosen[k - 1::n]
    return [s for u in chosen for s in u]
