"""``python -m server.report RUN_DIR``: rebuild every table and figure of a run folder from its stored
cells, artifacts and records (server/reports/ holds the writers)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from common.threads import setup_process
from server.reports.figures import rebuild_report
from server.reports.run_files import rebuild_all
from server.store.run_folder import RunFolder, one_line

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
    resolved = args.run_dir / "scenario.resolved.yaml"
    if not os.path.lexists(resolved):  # checked before the lock: a report creates nothing in a folder that is no run
        print(f"server.report: {resolved} not found: is {args.run_dir} a fedpdd run folder?", file=sys.stderr)
        return 1
    try:
        with RunFolder(args.run_dir):  # one writer at a time; every write confined to the folder
            written = rebuild_report(args.run_dir) if args.cells_only else rebuild_all(args.run_dir, audit=not args.no_audit)
    except FileNotFoundError as err:  # not a run folder, or no cells: a one-line reason, exit 1
        print(f"server.report: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:  # a file of the folder is refused (link, alias, tensor, manifest): exit 2
        print(f"server.report: {one_line(err)}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
