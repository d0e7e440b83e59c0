"""The device's own privacy policy: what it releases, whatever the server's scenario says.

Every setting comes from the node, never from the server: first ``--node-config`` (the SuperNode's
owner), then the device process's environment (how a simulated device is configured: Flower's
simulation has no per-node config beyond the partition), then built-in defaults that depend on
nothing the server sends.

==================  =====================  ==========================  =================================
node_config key     environment            default                     meaning
==================  =====================  ==========================  =================================
max-safe-per-class  FEDPDD_SAFE_CAP        50                          distinct images per class the
                                                                       device ever releases (-1: no cap)
safe-policy         FEDPDD_SAFE_POLICY     random                      random | first: its release order
safe-seed           FEDPDD_SAFE_SEED       0                           seed of the random order
max-dsv-per-class   FEDPDD_DSV_CAP         50                          DSVs per class one query may ask
state-dir           FEDPDD_NODE_STATE      <cache>/node-state          where the release ledger lives
data-root           FEDPDD_DATA_ROOT       none: the built-in search   the folder of its dataset files
                                           (common/datasets.py)
data-download       FEDPDD_DATA_DOWNLOAD   false                       may it download the dataset
==================  =====================  ==========================  =================================

:class:`ReleaseLedger` is the device's record of every image it has released (content keys per
class, ``common.records.image_keys``), kept in its state directory across queries and runs: an image
already released costs nothing to send again, a new one is released only while the class has
fewer than the cap. A server that changes seed, policy or offsets between queries therefore
never collects more than the cap of distinct images per class.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from common.atomic import atomic_write_text
from common.datasets import cache_root  # the device's own cache, FEDPDD_CACHE on this device
from edge_client.safe import POLICIES

__all__ = ["NodePolicy", "ReleaseLedger", "node_data", "node_policy", "DEFAULT_SAFE_CAP", "DEFAULT_DSV_CAP"]

DEFAULT_SAFE_CAP = 50
DEFAULT_DSV_CAP = 50

_SETTINGS = {  # node_config key -> environment variable
    "max-safe-per-class": "FEDPDD_SAFE_CAP",
    "safe-policy": "FEDPDD_SAFE_POLICY",
    "safe-seed": "FEDPDD_SAFE_SEED",
    "max-dsv-per-class": "FEDPDD_DSV_CAP",
    "state-dir": "FEDPDD_NODE_STATE",
    "data-root": "FEDPDD_DATA_ROOT",
    "data-download": "FEDPDD_DATA_DOWNLOAD",
}


@dataclass(frozen=True)
class NodePolicy:
    safe_cap: int  # -1: no cap
    safe_policy: str
    safe_seed: int
    dsv_cap: int
    state_dir: Path


def _setting(node_config: Mapping[str, Any], key: str) -> Any:
    if key in node_config:
        return node_config[key]
    return os.environ.get(_SETTINGS[key])


def _int(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"node setting {key} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"node setting {key} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def node_policy(node_config: Mapping[str, Any]) -> NodePolicy:
    """The device's settings (node_config, then environment, then defaults; never the server's scenario)."""
    cap = _setting(node_config, "max-safe-per-class")
    policy = _setting(node_config, "safe-policy")
    seed = _setting(node_config, "safe-seed")
    dsv = _setting(node_config, "max-dsv-per-class")
    state = _setting(node_config, "state-dir")
    policy = "random" if policy is None else str(policy)
    if policy not in POLICIES:
        raise ValueError(f"node setting safe-policy must be one of {list(POLICIES)}, got {policy!r}")
    return NodePolicy(
        safe_cap=DEFAULT_SAFE_CAP if cap is None else _int(cap, "max-safe-per-class", -1, 2**31 - 1),
        safe_policy=policy,
        safe_seed=0 if seed is None else _int(seed, "safe-seed", 0, 2**32 - 1),
        dsv_cap=DEFAULT_DSV_CAP if dsv is None else _int(dsv, "max-dsv-per-class", 1, 100_000),
        state_dir=Path(str(state)).expanduser() if state else cache_root() / "node-state",
    )


def node_data(node_config: Mapping[str, Any]) -> tuple[str | None, bool]:
    """(data root, download allowed) of this device; the scenario's ``data.root`` / ``data.download`` never count."""
    root = _setting(node_config, "data-root")
    download = _setting(node_config, "data-download")
    if isinstance(download, str):
        text = download.strip().lower()
        if text not in ("true", "false", "1", "0", ""):
            raise ValueError(f"node setting data-download must be true or false, got {download!r}")
        download = text in ("true", "1")
    elif download is not None and not isinstance(download, bool):
        raise ValueError(f"node setting data-download must be true or false, got {download!r}")
    return (str(root) if root not in (None, "") else None), bool(download)


class ReleaseLedger:
    """The content keys of the images this device has released, per class, on disk.

    ``release`` decides and records in one step under an exclusive file lock, and the file is
    replaced atomically before anything is sent: a crash after it can only over-count.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextmanager
    def _locked(self) -> Iterator[dict[str, list[int]]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self._read()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, list[int]]:
        if not self.path.exists():
            return {}
        data = json.loads(self.path.read_text())
        released = data.get("released") if isinstance(data, dict) else None
        if not isinstance(released, dict) or not all(
                isinstance(v, list) and all(isinstance(k, int) for k in v) for v in released.values()):
            raise ValueError(f"{self.path} is not a release ledger; refusing to release anything")
        return released

    def _write(self, released: dict[str, list[int]]) -> None:
        atomic_write_text(self.path, json.dumps({"version": 1, "released": released}), root=self.path.parent)

    def released(self) -> dict[int, set[int]]:
        """class -> the keys released so far."""
        with self._locked() as released:
            return {int(c): set(keys) for c, keys in released.items()}

    def release(self, keys: Sequence[int], labels: Sequence[int], cap: int) -> np.ndarray:
        """Which of the candidate images (in the device's order) may go: a bool mask.

        Already released images always may; a new one only while its class holds fewer than ``cap``
        released keys (``cap`` -1: no limit). The new releases are on disk when this returns.
        """
        keys = [int(k) for k in keys]
        labels = [int(c) for c in labels]
        mask = np.zeros(len(keys), dtype=bool)
        with self._locked() as released:
            sets = {c: set(v) for c, v in released.items()}
            changed = False
            for i, (key, c) in enumerate(zip(keys, labels)):
                have = sets.setdefault(str(c), set())
                if key in have:
                    mask[i] = True
                elif cap < 0 or len(have) < cap:
                    have.add(key)
                    mask[i] = changed = True
            if changed:
                self._write({c: sorted(v) for c, v in sets.items()})
        return mask
