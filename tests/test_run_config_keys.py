"""The run-config keys are declared once (common.scenario.RUN_CONFIG_ALIASES) and written in two more places
that must agree with it: pyproject.toml's [tool.flwr.app.config] (Flower refuses undeclared keys) and the
README's list of short keys."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from common.scenario import RUN_CONFIG_ALIASES

ROOT = Path(__file__).resolve().parents[1]
FREE_FORM = {"scenario", "overrides"}  # the scenario file and the dotted 'key=value;...' pairs


def test_pyproject_declares_exactly_the_aliases() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(config) == set(RUN_CONFIG_ALIASES) | FREE_FORM
    assert all(config[k] == "" for k in RUN_CONFIG_ALIASES)  # "" = unset: the scenario's value holds


def test_readme_lists_exactly_the_short_keys() -> None:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"Short keys: `([^`]+)`", text)
    assert found, "README.md lost its 'Short keys: `...`' list"
    assert set(found.group(1).split()) == set(RUN_CONFIG_ALIASES)
