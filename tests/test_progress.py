"""common.progress: log-line progress without a terminal, short scenario fingerprints in log lines."""

from __future__ import annotations

import json
import logging

import pytest
from rich.progress import Progress

from common.progress import (
    LogProgress,
    ScenarioDumpFilter,
    format_duration,
    install_scenario_filter,
    make_progress,
    progress_every_s,
    scenario_fingerprint,
)


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_log_progress_writes_periodic_lines_with_steps_elapsed_eta_and_status() -> None:
    clock = _Clock()
    with LogProgress(every_s=10, logger=logging.getLogger("test.progress"), clock=clock) as bar:
        task = bar.add_task("dkkt_dm ipc=1", total=200, status="")
        for it in range(1, 201):
            clock.t += 0.5  # 0.5 s per iteration: a line every 20 iterations
            bar.update(task, completed=it, status=f"total={1.0 / it:.3g}")
    lines = bar.lines
    assert lines[0] == "dkkt_dm ipc=1: started, 200 steps"
    assert lines[1] == "dkkt_dm ipc=1: 20/200, 10%, elapsed 10s, ETA 1m30s, total=0.05"
    assert lines[-1] == "dkkt_dm ipc=1: 200/200, 100%, elapsed 1m40s, done, total=0.005"
    assert len(lines) == 1 + 9 + 1  # start, one per 10 s until 90 s, the final line


def test_log_progress_advance_and_unfinished_task_gets_a_final_line() -> None:
    clock = _Clock()
    bar = LogProgress(every_s=5, logger=logging.getLogger("test.progress"), clock=clock)
    with bar:
        task = bar.add_task("eval sam", total=300, status="")
        clock.t += 6
        bar.update(task, advance=3, status="model 1/3 train_loss=2.1")
        clock.t += 1
        bar.update(task, advance=3)  # within 5 s of the last line: no line
    assert bar.lines[1] == "eval sam: 3/300, 1%, elapsed 6s, ETA 9m54s, model 1/3 train_loss=2.1"
    assert bar.lines[-1].startswith("eval sam: 6/300, 2%, elapsed 7s, done")
    assert len(bar.lines) == 3


def test_log_progress_goes_to_the_flower_logger(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("flwr")
    with caplog.at_level(logging.INFO, logger="flwr"):
        with LogProgress(every_s=0, logger=logger) as bar:
            t = bar.add_task("dm ipc=1", total=2, status="")
            bar.update(t, completed=1, status="dm=3")
            bar.update(t, completed=2)
    text = caplog.text
    assert "dm ipc=1: 1/2, 50%" in text and "dm ipc=1: 2/2, 100%" in text and "done" in text


def test_make_progress_without_terminal_logs_and_disabled_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert isinstance(make_progress(True), LogProgress)
    off = make_progress(False)
    assert isinstance(off, Progress) and off.disable
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    on = make_progress(True)
    assert isinstance(on, Progress) and not on.disable


def test_progress_interval_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPDD_PROGRESS_EVERY_S", "2.5")
    assert progress_every_s() == 2.5
    monkeypatch.setenv("FEDPDD_PROGRESS_EVERY_S", "often")
    with pytest.raises(ValueError, match="FEDPDD_PROGRESS_EVERY_S='often'"):
        progress_every_s()


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 42.4, 185, 3725)] == ["0s", "42s", "3m05s", "1h02m"]


def test_scenario_dump_is_replaced_by_a_fingerprint_in_log_records() -> None:
    scenario_json = json.dumps({"name": "quickstart", "distill": {"methods": ["dm", "dkkt_dm"]}, "pad": "x" * 2000})
    fp = scenario_fingerprint(scenario_json, "quickstart")
    assert fp.startswith("quickstart@") and f"({len(scenario_json)} B)" in fp
    flt = ScenarioDumpFilter(scenario_json, "quickstart")
    # what Flower's strategy logs: "\t├── ConfigRecord (train): %s" with the record as text
    record = logging.LogRecord("flwr", logging.INFO, __file__, 1, "\t├── ConfigRecord (train): %s",
                               (f"{{'scenario-json': {scenario_json}, 'lr': 0.01}}",), None)
    assert flt.filter(record)
    line = record.getMessage()
    assert line == f"\t├── ConfigRecord (train): {{'scenario-json': {fp}, 'lr': 0.01}}"
    assert len(line) < 120


def test_install_scenario_filter_replaces_the_previous_one() -> None:
    logger = logging.getLogger("flwr")
    first = install_scenario_filter('{"a": 1}', "a")
    second = install_scenario_filter('{"b": 2}', "b")
    try:
        assert second in logger.filters and first not in logger.filters
    finally:
        logger.removeFilter(second)
