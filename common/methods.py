"""The method registry: what each distillation method needs, which terms of Eq. 5 it
optimises, how it starts and which image optimizer "auto" gives it. Every other place
(the engine, the scenario checks, the sweep's skip rules, the CLI) asks this table instead
of listing method names. Plain data: no torch, no Flower.

    L_total(S) = L_primal(S) + alpha L_stat(S) + gamma L_DM(S)      (paper Eq. 5)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MethodSpec", "REGISTRY", "METHODS", "spec", "needs_model", "needs_safe", "uses_dsvs",
           "optimizes", "NO_MODEL_METHODS"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    terms: tuple[str, ...]  # subset of ("primal", "stat", "dm"); () = no optimisation
    dm_weight: str | None  # "one" (pure DM) | "gamma" (Eq. 5) | None (no DM term)
    init: str  # "config" (distill.init; auto -> appendix A, the same start for every such method of a grid)
    #            | "noise" | "real" (ipc safe images per class) | "dsvs" (the given/extracted DSVs)
    #            | "none" (the whole pool)
    needs_safe: bool  # reads the safe pool T'
    uses_dsvs: bool = False  # combines pre-extracted DSVs (given, or extracted from theta*)
    img_optimizer: str | None = None  # a recipe that fixes its image optimizer (None: distill.img_optimizer)

    @property
    def needs_model(self) -> bool:
        """theta* is needed for the DKKT terms (blend / dm_from_dsv only without given DSVs)."""
        return "primal" in self.terms or "stat" in self.terms


REGISTRY: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("dm", "Distribution Matching alone (Eq. 2, weight 1)", ("dm",), "one", "config", True),
    MethodSpec("dsv", "Deep-KKT alone (Eq. 4) from noise", ("primal", "stat"), None, "noise", False),
    MethodSpec("dsv_real", "Deep-KKT alone (Eq. 4) from real safe images", ("primal", "stat"), None, "real", True),
    MethodSpec("dkkt_dm", "the paper's Eq. 5: Deep-KKT + gamma DM", ("primal", "stat", "dm"), "gamma", "config", True),
    MethodSpec("blend", "pixel average of DSVs and DM images (paper Fig. 3)", ("dm",), "one", "config", True,
               uses_dsvs=True),
    MethodSpec("dm_from_dsv", "DM started from the DSVs", ("dm",), "one", "dsvs", True, uses_dsvs=True),
    MethodSpec("random_real", "ipc random safe images per class", (), None, "real", True),
    MethodSpec("safe_all", "every safe image (pipc per class)", (), None, "none", True),
    # The DM reference's own recipe (main_DM.py): real init, SGD lr_img / momentum_img (1.0 / 0.5), a control.
    MethodSpec("dm_reference", "DM as the reference runs it: real init, SGD (lr_img, momentum_img)", ("dm",), "one",
               "real", True, img_optimizer="sgd"),
)}
METHODS: tuple[str, ...] = tuple(REGISTRY)
# Methods a server without theta* can run (privacy.mode no_model_access): those without DKKT terms,
# plus "dsv", which there means the clients' uploaded DSVs as they are.
NO_MODEL_METHODS: tuple[str, ...] = tuple(m for m, s in REGISTRY.items() if not s.needs_model or m == "dsv")


def spec(method: str) -> MethodSpec:
    """The registry entry; ValueError naming the valid methods for an unknown one."""
    try:
        return REGISTRY[method]
    except KeyError:
        raise ValueError(f"unknown distillation method {method!r}; valid methods: {list(METHODS)}") from None


def needs_model(method: str) -> bool:
    return spec(method).needs_model


def needs_safe(method: str) -> bool:
    return spec(method).needs_safe


def uses_dsvs(method: str) -> bool:
    return spec(method).uses_dsvs


def optimizes(method: str) -> bool:
    """True for the methods that run gradient steps on S."""
    return bool(spec(method).terms)
