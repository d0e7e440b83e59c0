"""A rich progress bar shared by distillation and evaluation (no Flower imports)."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["make_progress"]


def make_progress(enabled: bool = True) -> Progress:
    """Progress bar with a free-text ``status`` field (current loss terms, accuracy...).

    ``enabled=False`` gives a no-op bar (tests, nested runs). Use as a context manager;
    add tasks with ``progress.add_task(description, total=N, status="")``.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        disable=not enabled,
        transient=False,
    )
