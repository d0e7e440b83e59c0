"""Accuracy before / after the DKKT approximations (issue 15, item 3): the core comparison's
dkkt_dm[adam] cell with and without ``DistillConfig.aug_passes="sample"`` and
``stat_candidates`` (``--m``), paired by seed, through ``scenarios/core_result.py``.

    python bench/dkkt_approx_cell.py --run /work/main/runs/core-fed --out runs/dkkt-approx \\
        --ipc 10 --pipc 50 --iterations 80 --eval-epochs 80 [--m 10]

Every other argument goes to ``scenarios/core_result.py`` unchanged; this script only adds the
variant ``dkkt_dm[adam,approx]`` and its pair with ``dkkt_dm[adam]`` before calling it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--m", type=int, default=10, help="stat_candidates of the approximated arm")
    a, rest = p.parse_known_args(argv)
    from scenarios import core_result as cr

    name = "dkkt_dm[adam,approx]"
    cr.VARIANTS[name] = ("dkkt_dm", {"img_optimizer": "adam", "aug_passes": "sample", "stat_candidates": a.m})
    cr.PAIRS = cr.PAIRS + ((name, "dkkt_dm[adam]", f"aug_passes=sample, stat_candidates={a.m} vs exact"),)
    if "--variants" not in rest:
        rest += ["--variants", f"dkkt_dm[adam],{name}"]
    return cr.main(rest)


if __name__ == "__main__":
    sys.exit(main())
