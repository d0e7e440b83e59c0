"""Progress for long work, on a terminal or not (no Flower imports).

``make_progress(enabled)`` gives a rich progress bar when stderr is a terminal, and otherwise
(a ServerApp under ``flwr run``, CI, a log file) a :class:`LogProgress` that writes one log
line every ``FEDPDD_PROGRESS_EVERY_S`` seconds (default 10) per task, with steps done / total,
the latest status (losses), elapsed time and ETA, plus a line when the task starts and one
when it finishes. ``enabled=False`` is silent (tests, nested runs).

Both share the subset of rich's API the code uses: ``add_task(description, total=N,
status="")`` and ``update(task, advance=k | completed=n, status=...)``, as a context manager.

Also here: :func:`scenario_fingerprint` and :class:`ScenarioDumpFilter`, which replace the
resolved scenario JSON that travels in every ConfigRecord with a short fingerprint in log
lines (Flower's strategy logs the whole ConfigRecord, a 2 KB line, twice per run).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["make_progress", "LogProgress", "progress_every_s", "format_duration", "scenario_fingerprint",
           "ScenarioDumpFilter", "install_scenario_filter"]

ENV_EVERY = "FEDPDD_PROGRESS_EVERY_S"
_logger = logging.getLogger("flwr")  # the logger every fedpdd line goes to (flwr.common.logger.log)


def progress_every_s() -> float:
    """Seconds between two progress lines of a task (``FEDPDD_PROGRESS_EVERY_S``, default 10)."""
    raw = os.environ.get(ENV_EVERY, "").strip()
    try:
        value = float(raw) if raw else 10.0
    except ValueError:
        raise ValueError(f"environment variable {ENV_EVERY}={raw!r} must be a number of seconds") from None
    return max(0.0, value)


def format_duration(seconds: float) -> str:
    """'42s', '3m05s', '1h02m'."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0.0
    status: str = ""
    started: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)
    finished: bool = False


class LogProgress:
    """Progress as periodic log lines: a drop-in for the part of ``rich.progress.Progress`` used here."""

    def __init__(self, every_s: float | None = None, logger: logging.Logger | None = None,
                 clock: Any = time.monotonic) -> None:
        self.every_s = progress_every_s() if every_s is None else every_s
        self.logger = logger or _logger
        self.clock = clock
        self.tasks: dict[int, _Task] = {}
        self.lines: list[str] = []  # every line written (tests, summaries)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task_id, task in self.tasks.items():
            if not task.finished and exc[0] is None:
                self._emit(task_id, final=True)

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        task_id = len(self.tasks)
        now = self.clock()
        self.tasks[task_id] = _Task(description, total, status=str(fields.get("status", "")), started=now,
                                    last_line=now)
        self._write(f"{description}: started" + (f", {int(total)} steps" if total else ""))
        return task_id

    def update(self, task_id: int, *, advance: float | None = None, completed: float | None = None,
               status: str | None = None, **_: Any) -> None:
        task = self.tasks[task_id]
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if status is not None:
            task.status = status
        if task.total is not None and task.completed >= task.total and not task.finished:
            self._emit(task_id, final=True)
        elif self.clock() - task.last_line >= self.every_s:
            self._emit(task_id)

    def _emit(self, task_id: int, final: bool = False) -> None:
        task = self.tasks[task_id]
        now = self.clock()
        task.last_line = now
        elapsed = now - task.started
        done = f"{int(task.completed)}/{int(task.total)}" if task.total else f"{int(task.completed)}"
        parts = [f"{task.description}: {done}"]
        if task.total:
            parts.append(f"{100 * task.completed / task.total:.0f}%")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if final:
            task.finished = True
            parts.append("done")
        elif task.total and task.completed > 0:
            parts.append(f"ETA {format_duration(elapsed / task.completed * (task.total - task.completed))}")
        if task.status:
            parts.append(task.status)
        self._write(", ".join(parts))

    def _write(self, line: str) -> None:
        self.lines.append(line)
        self.logger.log(INFO, line)


def make_progress(enabled: bool = True) -> Progress | LogProgress:
    """A rich bar on a terminal, periodic log lines elsewhere; ``enabled=False``: silent.

    Use as a context manager; add tasks with ``progress.add_task(description, total=N, status="")``.
    """
    if enabled and not sys.stderr.isatty():
        return LogProgress()
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


# ---------------------------------------------------------------- short scenario fingerprints in log lines


def scenario_fingerprint(scenario_json: str, name: str | None = None) -> str:
    """'quickstart@3f2a9c01d4e5 (2113 B)': name, sha256 prefix and size of the resolved scenario JSON."""
    digest = hashlib.sha256(scenario_json.encode()).hexdigest()[:12]
    return f"{name or 'scenario'}@{digest} ({len(scenario_json.encode())} B)"


class ScenarioDumpFilter(logging.Filter):
    """Replace the resolved scenario JSON inside a log record with its fingerprint.

    Flower's strategy logs its train/evaluate ConfigRecords verbatim; ours carry the whole
    scenario for the clients, which made each of those lines ~2 KB.
    """

    def __init__(self, scenario_json: str, name: str | None = None) -> None:
        super().__init__()
        self.scenario_json = scenario_json
        self.short = scenario_fingerprint(scenario_json, name)
        # the ConfigRecord is printed with repr(), which escapes the JSON's quotes
        self._forms = {scenario_json, repr(scenario_json)[1:-1], scenario_json.replace('"', '\\"')}

    def _shorten(self, text: str) -> str:
        for form in self._forms:
            if form and form in text:
                text = text.replace(form, self.short)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self._shorten(record.msg)
        if record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            record.args = tuple(self._shorten(a) if isinstance(a, str) else a for a in args)
        return True


def install_scenario_filter(scenario_json: str, name: str | None = None) -> ScenarioDumpFilter:
    """Attach a :class:`ScenarioDumpFilter` for this scenario to Flower's logger (replacing an earlier one)."""
    for old in [f for f in _logger.filters if isinstance(f, ScenarioDumpFilter)]:
        _logger.removeFilter(old)
    flt = ScenarioDumpFilter(scenario_json, name)
    _logger.addFilter(flt)
    return flt
