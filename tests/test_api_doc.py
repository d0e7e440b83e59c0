"""docs/API.md is generated from the code (docs/generate_api.py): it must hold exactly what the generator
prints, so a changed public name or signature fails here until the reference is regenerated."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("generate_api", ROOT / "docs" / "generate_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_api_reference_is_what_the_code_says() -> None:
    gen = _generator()
    assert (ROOT / "docs" / "API.md").read_text() == gen.document(), \
        "docs/API.md is stale: run python docs/generate_api.py --write"


def test_every_exported_name_is_listed_with_its_module() -> None:
    gen = _generator()
    text = gen.generate()
    from server import reevaluate

    assert "## `server.reevaluate`" in text
    for name in reevaluate.__all__:
        assert f"- `{name}(" in text
    assert " at 0x" not in text and str(ROOT) not in text  # the same in every clone: no addresses, no paths
