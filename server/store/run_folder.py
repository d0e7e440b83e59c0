"""The run folder's owner: every file fedpdd writes into a run folder goes through this module.

:class:`RunFolder` holds one run folder:

- **one writer at a time**: :meth:`RunFolder.acquire` takes an exclusive ``fcntl.flock`` on
  ``<run>/.fedpdd.lock`` (holding the holder's PID); a second process that opens the same folder stops
  with :class:`RunFolderBusy`, one line naming that PID. The lock is re-entrant within a process and
  released when the process ends (also on ``kill -9``);
- **atomic, confined writes**: :meth:`RunFolder.write` and its text / JSON / torch / figure forms write
  a temporary file and ``os.replace`` it (``common.atomic``); the target must stay inside the folder
  (no ``..``, no absolute path elsewhere) and no component below the folder, the file included, may be a
  symbolic link: such a write raises ``common.atomic.UnsafePathError`` and writes nothing;
- **the manifest entry with the write**: ``record=True`` adds the file's sha256 and tensor shapes to
  ``manifest.json`` (``server.store.manifest``) right after the rename;
- **checked reads**: :meth:`RunFolder.read_text` / :meth:`RunFolder.read_yaml` refuse links and files
  over a size limit, and YAML goes through the alias-free loader of the scenario files;
- **the output-folder guard**: :meth:`RunFolder.open_for_run` refuses a non-empty folder that is not a
  fedpdd run, and a folder whose stored run (``scenario.resolved.yaml``) has other settings unless the
  run asks to recompute (``distill.resume: false``); an identical run resumes.

Writers that are handed a bare path (tables, figures, image grids) call the module functions
:func:`write_text`, :func:`write_csv`, :func:`save_figure`, which confine the write to the run folder
that holds the path (the folder a :class:`RunFolder` holds open in this process, else the nearest
folder above the path with a run marker).
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import io
import json
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import torch
import yaml

from common.atomic import (RUN_MARKERS, UnsafePathError, atomic_write, confine, register_root,
                           unregister_root)
from common.config import DEVICE_PROFILE, DistillConfig
from common.scenario import Scenario, safe_yaml_load, scenario_from_dict
from server.store.manifest import federation_stamp, record_files

__all__ = ["LOCK", "RunFolder", "RunFolderError", "RunFolderBusy", "UnsafePathError", "MAX_READ_BYTES",
           "one_line", "write_file", "write_text", "write_csv", "write_dict_csv", "save_figure", "run_settings", "settings_diff"]

LOCK = ".fedpdd.lock"
MAX_READ_BYTES = 64 << 20  # a text / YAML / JSON file read back from a run folder
_HELD: dict[Path, tuple[int, int]] = {}  # root -> (lock fd, depth) for the folders this process holds

# Scenario keys that say where and how a run runs, or which cells of the grid it computes: a rerun that
# changes only these resumes in the same folder (the federation stamp covers the pool size they imply).
_WHERE_HOW = ("output_dir", "device", "name", "reuse_artifacts")
_GRID = tuple(f.name for f in dataclasses.fields(DistillConfig) if f.metadata.get("sweep"))
_RECOMPUTE_HINT = ("use another output-dir (--run-config \"output-dir='runs/<new>'\") or recompute into this folder "
                   "(--run-config \"overrides='distill.resume=false'\")")


def one_line(err: BaseException) -> str:
    """An error as one line (its message's lines joined), for a CLI's stderr."""
    return " ".join(str(err).split()) or type(err).__name__


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (one line, with the fix)."""


class RunFolderBusy(RunFolderError):
    """Another process holds the run folder's lock."""


def run_settings(values: dict[str, Any]) -> dict[str, Any]:
    """A resolved scenario's keys minus where/how it runs (the device and its profile's settings, which change
    no number beyond float rounding) and the grid's axes (plain JSON values)."""
    d = json.loads(json.dumps(values, default=str))
    for key in _WHERE_HOW:
        d.pop(key, None)
    for dotted in DEVICE_PROFILE:
        section, key = dotted.split(".")
        if isinstance(d.get(section), dict):
            d[section].pop(key, None)
    distill = d.get("distill")
    if isinstance(distill, dict):
        for key in _GRID:
            distill.pop(key, None)
    return d


def settings_diff(stored: Any, new: Any, defaults: Any = None, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between a stored nested dict and a new one. A key the stored one lacks was
    written before that setting existed: it counts as ``defaults``' value there (today's default), so a folder of
    an older version resumes while the new setting stays at its default."""
    if isinstance(stored, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(stored) | set(new)):
            sub = defaults.get(key) if isinstance(defaults, dict) else None
            if key not in stored and isinstance(defaults, dict) and key in defaults:
                out += [] if new.get(key) == sub else [f"{prefix}{key}"]
                continue
            out += settings_diff(stored.get(key), new.get(key), sub, f"{prefix}{key}.")
        return out
    return [] if stored == new else [prefix.rstrip(".")]


def default_settings() -> tuple[dict[str, Any], dict[str, Any]]:
    """(run_settings, federation_stamp) of a scenario at today's defaults: what a key absent from an older
    folder's records stands for."""
    default = scenario_from_dict({})
    return run_settings(default.to_dict()), federation_stamp(default)


class RunFolder:
    """One run folder: lock, atomic confined writes recorded in the manifest, checked reads."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()  # links above the folder are the user's; none below it

    # ------------------------------------------------------------------ lock

    def acquire(self) -> RunFolder:
        """Take the folder's exclusive lock (creating the folder); :class:`RunFolderBusy` when another
        process holds it."""
        if self.root in _HELD:
            fd, depth = _HELD[self.root]
            _HELD[self.root] = (fd, depth + 1)
            register_root(self.root)
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        lock = confine(self.root, LOCK)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise RunFolderError(f"cannot open the lock {lock}: {err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusy(f"{self.root} is in use by process {holder} (lock {lock}); wait for it to finish "
                                "or use another output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[self.root] = (fd, 1)
        register_root(self.root)
        return self

    def release(self) -> None:
        """Give the lock back (the outermost release of this process unlocks)."""
        if self.root not in _HELD:
            return
        unregister_root(self.root)
        fd, depth = _HELD[self.root]
        if depth > 1:
            _HELD[self.root] = (fd, depth - 1)
            return
        del _HELD[self.root]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunFolder:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ the folder as an output

    @staticmethod
    def is_run(root: str | os.PathLike[str]) -> bool:
        """True when ``root`` holds a run marker (lock, manifest or resolved scenario)."""
        return any(os.path.lexists(Path(root) / m) for m in RUN_MARKERS)

    def open_for_run(self, scenario: Scenario) -> RunFolder:
        """Lock the folder for ``scenario``'s run after checking it may write there.

        Refuses (:class:`RunFolderError`, one line): a non-empty folder that is not a fedpdd run; a fedpdd
        run whose stored settings differ from ``scenario``'s, unless ``distill.resume`` is off (recompute).
        A run with the same settings (grid axes and where/how it runs aside) resumes."""
        if self.root.is_dir() and not self.is_run(self.root) and any(self.root.iterdir()):
            raise RunFolderError(f"{self.root} is not empty and holds no fedpdd run; fedpdd writes only into an "
                                 "empty folder or its own run folder: use another output-dir")
        self.acquire()
        try:
            if scenario.distill.resume and (self.root / "scenario.resolved.yaml").exists():
                stored = self.read_yaml("scenario.resolved.yaml")
                if not isinstance(stored, dict):
                    raise RunFolderError(f"{self.root / 'scenario.resolved.yaml'} is not a mapping; {_RECOMPUTE_HINT}")
                new = json.loads(json.dumps(scenario.to_dict(), default=str))
                settings_default, stamp_default = default_settings()
                keys = settings_diff(run_settings(stored), run_settings(new), settings_default)
                if not keys and (self.root / "federation.json").exists():
                    fed = json.loads(self.read_text("federation.json"))
                    keys = [f"federation stamp: {k}" for k in settings_diff(fed, federation_stamp(scenario),
                                                                             stamp_default)]
                if keys:
                    raise RunFolderError(f"{self.root} holds a run with other settings ({', '.join(keys[:6])}"
                                         f"{', ...' if len(keys) > 6 else ''}); {_RECOMPUTE_HINT}")
        except BaseException:
            self.release()
            raise
        return self

    # ------------------------------------------------------------------ writes

    def path(self, rel: str | os.PathLike[str]) -> Path:
        """``root / rel``, confined (``UnsafePathError`` when it leaves the folder or goes through a link)."""
        return confine(self.root, rel)

    def write(self, rel: str | os.PathLike[str], writer: Callable[[IO[Any]], None], binary: bool = True,
              record: bool = False, fingerprint: str | None = None) -> Path:
        """Write ``rel`` atomically through ``writer``; ``record``: add it to the manifest."""
        path = atomic_write(self.root / rel, writer, binary=binary, root=self.root)
        if record:
            self.record([Path(rel).as_posix()], fingerprint)
        return path

    def write_text(self, rel: str | os.PathLike[str], text: str, record: bool = False) -> Path:
        return self.write(rel, lambda fh: fh.write(text.encode()), record=record)

    def write_json(self, rel: str | os.PathLike[str], obj: Any, record: bool = False) -> Path:
        return self.write_text(rel, json.dumps(obj, indent=1, sort_keys=True, default=str), record=record)

    def torch_save(self, rel: str | os.PathLike[str], obj: Any, record: bool = False,
                   fingerprint: str | None = None) -> Path:
        return self.write(rel, lambda fh: torch.save(obj, fh), record=record, fingerprint=fingerprint)

    def record(self, names: Iterable[str], fingerprint: str | None = None) -> Path:
        """Add (or refresh) the manifest entries of ``names`` (paths relative to the folder)."""
        names = list(names)
        for n in names:
            self.path(n)  # confined, no link
        return record_files(self.root, names, fingerprint)

    # ------------------------------------------------------------------ reads

    def read_bytes(self, rel: str | os.PathLike[str], limit: int = MAX_READ_BYTES) -> bytes:
        """The bytes of ``rel``: a regular file inside the folder, no link, at most ``limit`` bytes."""
        path = self.path(rel)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            raise RunFolderError(f"{path} cannot be read: {err.strerror}") from err
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise RunFolderError(f"{path} is not a regular file")
            if st.st_size > limit:
                raise RunFolderError(f"{path} is {st.st_size} bytes, over the {limit}-byte limit of a run-folder file")
            return fh.read(limit + 1)[:limit]

    def read_text(self, rel: str | os.PathLike[str], limit: int = MAX_READ_BYTES) -> str:
        try:
            return self.read_bytes(rel, limit).decode()
        except UnicodeDecodeError as err:
            raise RunFolderError(f"{self.root / rel} is not UTF-8 text: {err}") from err

    def read_yaml(self, rel: str | os.PathLike[str]) -> Any:
        """YAML through the scenario files' loader (no anchors or aliases, size-limited)."""
        try:
            return safe_yaml_load(self.read_text(rel))
        except yaml.YAMLError as err:
            raise RunFolderError(f"{self.root / rel}: {' '.join(str(err).split())}") from err


# ---------------------------------------------------------------------- writers handed a bare path


def write_file(path: str | os.PathLike[str], writer: Callable[[IO[Any]], None]) -> Path:
    """Atomic, confined write of a binary file that ``writer`` fills, inside the run folder that holds ``path``."""
    return atomic_write(path, writer)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomic, confined write of a text file inside the run folder that holds ``path``."""
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def write_csv(path: str | os.PathLike[str], rows: Sequence[Sequence[Any]] | Iterable[Sequence[Any]]) -> Path:
    """Atomic, confined write of ``rows`` as CSV (``csv.writer`` with its defaults)."""
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    return write_text(path, buf.getvalue())


def write_dict_csv(path: str | os.PathLike[str], fieldnames: Sequence[str], rows: Iterable[dict[str, Any]],
                   **kwargs: Any) -> Path:
    """Atomic, confined write of ``rows`` through ``csv.DictWriter`` (header first)."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(fieldnames), **kwargs)
    w.writeheader()
    w.writerows(rows)
    return write_text(path, buf.getvalue())


def save_figure(fig: Any, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """``fig.savefig`` into an atomic, confined write (``format`` defaults to the file's suffix)."""
    fmt = kwargs.pop("format", None) or Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, **kwargs))
