"""``python -m server.report RUN_DIR``: rebuild every table and figure of a run folder from its stored
cells, artifacts and records (server/reports/ holds the writers)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from common.threads import setup_process
from server.reports.figures import rebuild_report
from server.reports.run_files import rebuild_all

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server.report RUN_DIR``: rebuild every table and figure from the run folder."""
    parser = argparse.ArgumentParser(description="Rebuild every table and figure of a run folder from its stored "
                                                 "cells, artifacts and records (nothing is distilled or trained): "
                                                 "results.*, frequency.csv, figures, rounds.*, uploads.*, failures.csv, "
                                                 "communication.*, privacy.md, privacy_audit.csv, privacy/*.png, "
                                                 "images/*.png.")
    parser.add_argument("run_dir", type=Path, help="run folder (holds scenario.resolved.yaml and cells/)")
    parser.add_argument("--no-audit", action="store_true",
                        help="keep privacy_audit.csv and privacy/*.png (the audit reloads the training images)")
    parser.add_argument("--cells-only", action="store_true",
                        help="only what the cells give: results.*, frequency.csv, image grids and figures")
    args = parser.parse_args(argv)
    setup_process("server")  # the audit embeds thousands of images: same policy as the ServerApp
    try:
        written = rebuild_report(args.run_dir) if args.cells_only else rebuild_all(args.run_dir, audit=not args.no_audit)
    except FileNotFoundError as err:  # not a run folder, or no cells: a one-line reason, exit 1
        print(f"server.report: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # a file that does not match its manifest, a malformed record or scenario: exit 2
        text = str(err).strip()
        print(f"server.report: {text.splitlines()[0] if text else type(err).__name__}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
