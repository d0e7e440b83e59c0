"""Atomic, confined file writes: the one place that turns bytes into a file.

A write goes to a temporary file beside the target (created with ``O_CREAT | O_EXCL``, so it never
opens an existing file or link), is fsynced, then ``os.replace``-d onto the target, so a crash
never leaves a half-written file under the real name. The write is confined to a root folder
(a run folder, see ``server.store.run_folder``): the path relative to the root has no ``..`` and
no absolute part, and no component below the root (the target included) may be a symbolic link;
such a path raises :class:`UnsafePathError` naming it, and nothing is written. Folders that do not
exist yet are created one by one below the root, each checked.

The checks use ``lstat`` and are not race-free against a process that swaps a folder for a link
between the check and the write; they stop a link planted in a folder before the run or report
opens it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["UnsafePathError", "RUN_MARKERS", "register_root", "unregister_root", "find_root", "confine", "atomic_write", "atomic_write_text",
           "atomic_torch_save"]

# Files that mark a folder as a fedpdd run folder (the root a write inside it is confined to).
RUN_MARKERS = (".fedpdd.lock", "manifest.json", "scenario.resolved.yaml")


_ROOTS: dict[Path, int] = {}  # run folders this process holds open (server.store.run_folder.RunFolder)


class UnsafePathError(ValueError):
    """A write would leave its root folder or go through a symbolic link."""


def register_root(root: str | os.PathLike[str]) -> None:
    """Confine every write below ``root`` to ``root`` while it is registered (nested calls count)."""
    key = Path(os.path.abspath(root))
    _ROOTS[key] = _ROOTS.get(key, 0) + 1


def unregister_root(root: str | os.PathLike[str]) -> None:
    key = Path(os.path.abspath(root))
    if _ROOTS.get(key, 0) <= 1:
        _ROOTS.pop(key, None)
    else:
        _ROOTS[key] -= 1


def find_root(path: str | os.PathLike[str]) -> Path:
    """The run folder ``path`` lies in: the innermost registered root above it; else the nearest folder
    above it, itself no link, that holds one of :data:`RUN_MARKERS`; else ``path``'s own folder."""
    path = Path(os.path.abspath(path))
    held = [r for r in _ROOTS if path.is_relative_to(r) and path != r]
    if held:
        return max(held, key=lambda r: len(r.parts))
    for parent in path.parents:
        if not os.path.islink(parent) and any(os.path.lexists(parent / m) for m in RUN_MARKERS):
            return parent
    return path.parent


def confine(root: str | os.PathLike[str], rel: str | os.PathLike[str], create_dirs: bool = False) -> Path:
    """``root / rel`` after checking that it stays inside ``root`` and that no component below ``root``
    is a symbolic link (``create_dirs``: make the missing parent folders, each checked)."""
    root = Path(os.path.abspath(root))
    rel_path = Path(rel)
    if rel_path.is_absolute():
        try:
            rel_path = Path(os.path.abspath(rel_path)).relative_to(root)
        except ValueError:
            raise UnsafePathError(f"{rel} is outside the run folder {root}; nothing is written there") from None
    parts = rel_path.parts
    if not parts or any(p in ("..", "") for p in parts):
        raise UnsafePathError(f"{rel!s} leaves the run folder {root} ('..' or empty); nothing is written")
    current = root
    for i, part in enumerate(parts):
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            if i < len(parts) - 1 and create_dirs:
                os.mkdir(current)
                continue
            if i < len(parts) - 1:
                raise UnsafePathError(f"folder {current} does not exist") from None
            break
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(f"{current} is a symbolic link inside the run folder {root}; fedpdd never writes "
                                  "through links: remove it and rerun")
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"{current} is not a folder")
    return root / rel_path


def atomic_write(path: str | os.PathLike[str], writer: Callable[[IO[Any]], None], binary: bool = True,
                 root: str | os.PathLike[str] | None = None) -> Path:
    """Write ``path`` atomically and confined to ``root`` (default :func:`find_root`): ``writer`` fills an
    open temporary file (binary, or text with ``newline=''``), which then replaces the target."""
    path = Path(os.path.abspath(path))
    root = Path(os.path.abspath(root)) if root is not None else find_root(path)
    root.mkdir(parents=True, exist_ok=True)
    target = confine(root, path.relative_to(root) if path.is_relative_to(root) else path, create_dirs=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, root: str | os.PathLike[str] | None = None) -> Path:
    """:func:`atomic_write` of a text (UTF-8, newlines as given)."""
    return atomic_write(path, lambda fh: fh.write(text.encode()), root=root)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    import torch  # here, not at the top: common.scenario (torch-free for server.check) imports this module
    return atomic_write(path, lambda fh: torch.save(obj, fh), root=root)
