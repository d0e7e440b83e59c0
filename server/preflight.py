"""Checks of the inputs that need the file system or the loaded data (the scenario schema
itself is checked in common/scenario.py). They run on the server before any federation or
distillation work, and every error names the key or file and the fix.
"""

from __future__ import annotations

from pathlib import Path

from common.scenario import Scenario, ScenarioError

__all__ = ["check_data_root", "check_data_size"]


def check_data_root(scenario: Scenario) -> None:
    """``data.root`` set but not a folder: stop now (the loader would silently fall back elsewhere)."""
    root = scenario.data.root
    if root is None or not str(root).strip() or scenario.data.download:
        return  # with download on, the folder is the download target and may not exist yet
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise ScenarioError(
            f"{scenario.source}: key 'data.root' is {str(root)!r}, which {what}; point it at the folder holding "
            f"the {scenario.data.dataset} files, remove data.root to use the default places, or set "
            "data.download: true to fetch the dataset into it"
        )


def check_data_size(scenario: Scenario, num_train: int) -> None:
    """More clients than training samples cannot be partitioned."""
    n = scenario.federation.num_clients
    if n is not None and n > num_train:
        raise ScenarioError(
            f"{scenario.source}: key 'federation.num_clients' ({n}) exceeds the {num_train} training samples of "
            f"{scenario.data.dataset} (after data.train_limit): lower federation.num_clients or use more data"
        )
