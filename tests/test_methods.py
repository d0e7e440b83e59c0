"""Tests for common/methods.py (the method registry every other place asks)."""

from __future__ import annotations

import pytest

from common.grid import NEEDS_SAFE, real_init_methods, static_skip_reason
from common.methods import METHODS, NO_MODEL_METHODS, REGISTRY, spec


def test_registry_encodes_the_methods_terms_and_needs() -> None:
    assert METHODS == ("dm", "dsv", "dsv_real", "dkkt_dm", "blend", "dm_from_dsv", "random_real", "safe_all",
                       "dm_reference")
    assert {m for m in METHODS if spec(m).needs_model} == {"dsv", "dsv_real", "dkkt_dm"}
    assert set(NEEDS_SAFE) == set(METHODS) - {"dsv"}
    assert REGISTRY["dkkt_dm"].terms == ("primal", "stat", "dm") and REGISTRY["dkkt_dm"].dm_weight == "gamma"
    assert REGISTRY["dm"].dm_weight == "one" and REGISTRY["dsv"].dm_weight is None
    assert NO_MODEL_METHODS == ("dm", "dsv", "blend", "dm_from_dsv", "random_real", "safe_all", "dm_reference")
    assert REGISTRY["dm_reference"].img_optimizer == "sgd" and REGISTRY["dm_reference"].init == "real"
    assert all(REGISTRY[m].init == "config" for m in ("dm", "dkkt_dm", "blend"))  # one start for a grid
    with pytest.raises(ValueError, match="valid methods"):
        spec("dmm")


def test_real_init_and_skip_rules_follow_the_registry() -> None:
    assert real_init_methods("auto") == {"dsv_real", "random_real", "dm_reference"}
    assert real_init_methods("real") == {"dsv_real", "random_real", "dm_reference", "dm", "dkkt_dm"}
    assert static_skip_reason("dkkt_dm", 50, 10, "real") is not None
    assert static_skip_reason("dkkt_dm", 50, 10, "auto") is None
    assert "needs safe images" in static_skip_reason("dm", 1, 0, "auto")
    assert static_skip_reason("dsv", 1, 0, "auto") is None
