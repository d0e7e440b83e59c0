"""Deep-KKT loss (paper Eq. 3-4) built on the DeepKKT conditions of Deep Support Vectors
(Lee, Lee, Hwang & Kwak, "Deep Support Vectors", NeurIPS 2024, arXiv 2403.17329).

For candidates X = {(x_i, y_i, lambda_i)} and the frozen trained model Phi(.; theta*):

    L_primal = 1/n sum_i L(Phi(x_i; theta*), y_i)                             (Eq. 3)
    L_stat   = D(target, -sum_i lambda_i grad_theta L(Phi(x_i; theta_g), y_i))  (Eq. 3)
    L_kkt    = L_primal + alpha * L_stat                                         (Eq. 4)

Eq. 3 literally has target = theta* and theta_g = theta*. The defaults and why:

- D = cosine distance (``"cosine"``): scale-free, so lambda's overall scale drops out and the
  term keeps an O(1) gradient on the images whatever the loss magnitudes. An l1 / l2 distance
  is minimised by shrinking the combination towards 0 when the direction cannot be matched,
  which leaves its image gradient tiny. ``"l1"`` = mean over ALL parameters of |target - v|
  (DSV Sec. 4.2 and App. D: l1, averaged per parameter); ``"l2"`` = mean squared difference
  (DSV Alg. 1); ``stat_relative`` divides either by D(target, 0).
- target = theta* - theta_0 (``stationarity_target`` with ``init``), the displacement from the
  network FedAvg started from (theta_0 = the scenario-seeded ConvNet, which the server and
  every client can rebuild). A briefly trained theta* is mostly its initialisation, and no
  non-negative combination of loss gradients points along the initialisation; its learned
  part is what the gradients can explain. ``stat_target="theta"`` is Eq. 3 literally.
- theta_g = theta* (``at`` None). ``stationarity_points`` builds the alternatives: theta_0
  (the gradients the first FedAvg step followed: for one GD step from theta_0 on the real
  data, theta* - theta_0 = -lr sum_i grad L_i(theta_0) exactly) or the mean over points of
  the straight path theta_0 -> theta* (an approximation of the integral of the gradient along
  the trajectory). The primal term is always taken at theta*.
- lambda >= 0 (dual feasibility) is the caller's job: these functions take lambda itself and
  reject negative entries. ``synthesize`` parametrises lambda = exp(rho) (multiplicative
  steps, feasible by construction) or, with ``lambda_param="clamp"``, projects lambda back
  onto lambda >= 0 after every step (a fixed-size synthetic set cannot drop a candidate the
  way DSV Alg. 1 does, so it sits at 0 and may re-enter).
- L (the per-sample loss inside the gradient) is cross-entropy (DSV Sec. 4.2). The primal
  (``primal``) is ``"ce"`` = mean cross-entropy (Eq. 3) or ``"hinge"`` = DSV Eq. 7 (a
  correctly classified sample contributes 0).
- sum_i lambda_i grad L_i = grad of sum_i lambda_i L_i, so ONE weighted backward
  (``torch.autograd.grad`` with ``create_graph=True`` through ``torch.func.functional_call``)
  gives it per gradient point; no per-sample gradients. L_stat then differentiates back to
  x and lambda (double backward).
- Manifold condition (``dkkt_loss``): DSV Eq. 9 / Alg. 1 require the KKT conditions to hold
  for augmented candidates too: L = [L_kkt(x) + eta * L_kkt(A(x))] / (1 + eta) with eta =
  ``aug_weight`` (5, DSV App. D) and A = the project's DSA (one draw per call). Dividing by
  (1 + eta) keeps alpha and gamma at the scale of Eq. 4-5, which have no augmentation term;
  ``aug_weight=0`` drops the pass. DSV's total-variation / norm priors are left out (DSV sets
  their weights to 0 for dataset distillation, App. D).
- theta* are the model's parameters (not buffers). The model is used as given (callers put
  it in eval mode); its own parameters need not require grad.

The measurements behind these choices are in docs/mechanism.md.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from common.augment import DSAParams, apply_dsa

__all__ = [
    "STAT_DISTANCES",
    "stat_at_zero",
    "stationarity_target",
    "STAT_AT",
    "stationarity_points",
    "lambda_scale",
    "PRIMAL_MODES",
    "DEFAULT_AUG_WEIGHT",
    "AUG_PASSES",
    "primal_loss",
    "stationarity_loss",
    "kkt_terms",
    "dkkt_loss",
]

STAT_DISTANCES: tuple[str, ...] = ("l1", "l2", "cosine")
# Where the inner gradients of L_stat are taken: at theta*, at theta_0, or averaged over the straight path.
STAT_AT: tuple[str, ...] = ("theta_star", "theta0", "path")
PRIMAL_MODES: tuple[str, ...] = ("ce", "hinge")
DEFAULT_AUG_WEIGHT = 5.0  # eta of DSV Alg. 1 / App. D
# How the clean and augmented DKKT passes are evaluated per iteration: "both" (exact, the
# default) or "sample" (one of them, drawn with probabilities 1 : aug_weight; unbiased).
AUG_PASSES: tuple[str, ...] = ("both", "sample")


def _check_xy(x: Tensor, y: Tensor) -> None:
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch (N×...), got shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")


def _check_lam(lam: Tensor, n: int) -> None:
    if lam.shape != (n,):
        raise ValueError(f"lam must have shape ({n},) (one multiplier per sample), got {tuple(lam.shape)}")
    if bool((lam.detach() < 0).any()):
        raise ValueError(
            f"lam must be >= 0 (dual feasibility); got min {float(lam.detach().min()):.4g}"
        )


def _per_sample_primal(logits: Tensor, y: Tensor, mode: str) -> Tensor:
    ce = F.cross_entropy(logits, y, reduction="none")
    if mode == "ce":
        return ce
    if mode == "hinge":
        # DSV Eq. 7: no loss once the sample is classified correctly.
        wrong = (logits.detach().argmax(1) != y).to(ce.dtype)
        return ce * wrong
    raise ValueError(f"primal mode must be one of {list(PRIMAL_MODES)}, got {mode!r}")


def _distance(theta: Mapping[str, Tensor], v: Mapping[str, Tensor], distance: str) -> Tensor:
    names = list(theta)
    numel = sum(theta[k].numel() for k in names)
    if distance == "l1":
        return sum((theta[k] - v[k]).abs().sum() for k in names) / numel
    if distance == "l2":
        return sum(((theta[k] - v[k]) ** 2).sum() for k in names) / numel
    if distance == "cosine":
        dot = sum((theta[k] * v[k]).sum() for k in names)
        nt = torch.sqrt(sum((theta[k] ** 2).sum() for k in names))
        nv = torch.sqrt(sum((v[k] ** 2).sum() for k in names))
        # eps keeps the loss finite when the gradient combination vanishes (lam = 0).
        return 1.0 - dot / (nt * nv).clamp_min(1e-12)
    raise ValueError(f"stationarity distance must be one of {list(STAT_DISTANCES)}, got {distance!r}")


def stationarity_target(model: nn.Module, init: nn.Module | None = None) -> dict[str, Tensor]:
    """What the stationarity sum must reach: theta* (``init`` None, the paper's Eq. 3), or
    the displacement theta* - theta_0 from the network's known initialisation ``init``."""
    theta = {k: p.detach() for k, p in model.named_parameters()}
    if init is None:
        return theta
    start = dict(init.named_parameters())
    if set(start) != set(theta) or any(start[k].shape != theta[k].shape for k in theta):
        raise ValueError("stationarity target 'update': the initial network's parameters differ "
                         "in names or shapes from the trained model's")
    return {k: theta[k] - start[k].detach().to(theta[k].device, theta[k].dtype) for k in theta}


def stationarity_points(model: nn.Module, init: nn.Module | None, at: str = "theta_star",
                        points: int = 3) -> list[dict[str, Tensor]] | None:
    """The parameter sets where the inner gradients of L_stat are taken (``kkt_terms(at=...)``).

    ``"theta_star"``: None (the gradients at theta* itself, sharing the primal's forward pass);
    ``"theta0"``: [theta_0] from ``init``; ``"path"``: ``points`` (>= 2) evenly spaced points
    theta_0 + t (theta* - theta_0), t = 0 .. 1 both included, whose gradients are averaged."""
    if at not in STAT_AT:
        raise ValueError(f"stat_at must be one of {list(STAT_AT)}, got {at!r}")
    if at == "theta_star":
        return None
    if init is None:
        raise ValueError(f"stat_at {at!r} needs the initial network theta_0, got None")
    delta = stationarity_target(model, init)  # checks names and shapes
    theta = {k: p.detach() for k, p in model.named_parameters()}
    start = {k: theta[k] - delta[k] for k in theta}
    if at == "theta0":
        return [start]
    if not isinstance(points, int) or points < 2:
        raise ValueError(f"stat_at 'path' needs at least 2 path points, got {points!r}")
    ts = [i / (points - 1) for i in range(points)]
    return [{k: start[k] + t * delta[k] for k in theta} for t in ts]


def stat_at_zero(target: Mapping[str, Tensor], distance: str = "l1") -> float:
    """D(target, 0): L_stat when every lambda is 0 (or every gradient vanishes), the value
    an inert stationarity term sits at; 1 for cosine."""
    zero = {k: torch.zeros_like(t) for k, t in target.items()}
    return float(_distance(dict(target), zero, distance))


def lambda_scale(model: nn.Module, x: Tensor, y: Tensor, target: Mapping[str, Tensor] | None = None,
                 at: Sequence[Mapping[str, Tensor]] | None = None) -> float:
    """The common multiplier s >= 0 that brings -s * sum_i grad L_i closest to theta* in l2
    (least squares: s = <theta*, v> / ||v||^2 with v = -sum_i grad L_i, or ``target`` in place
    of theta*; when the two point
    apart, ||theta*|| / ||v|| so that at least the norms agree). Used to start lambda at
    the scale of theta* instead of 1: per-sample gradients of a trained model are tiny, so
    lambda = 1 leaves sum_i lambda_i grad L_i orders of magnitude short of theta*.
    ``at``: the gradient points of ``stationarity_points`` (their mean gradient; None: theta*)."""
    _check_xy(x, y)
    params = _live_params(model)
    points = list(at) if at is not None else [params]
    grads = [torch.zeros_like(p) for p in params.values()]
    for point in points:  # the mean gradient over the points (kkt_terms' inner sum)
        live = _live_points(params, point)
        ce = F.cross_entropy(functional_call(model, live, (x.detach(),)), y, reduction="sum")
        grads = [a + b / len(points) for a, b in zip(grads, torch.autograd.grad(ce, list(live.values())))]
    theta = [p.detach() for p in params.values()] if target is None else [target[k] for k in params]
    dot = sum(float((t * -g).sum()) for t, g in zip(theta, grads))
    vv = sum(float((g ** 2).sum()) for g in grads)
    tt = sum(float((t ** 2).sum()) for t in theta)
    if vv <= 0 or not math.isfinite(vv):
        return 1.0
    return dot / vv if dot > 0 else math.sqrt(tt / vv)


def _live_params(model: nn.Module) -> dict[str, Tensor]:
    # Detached leaves that require grad: grad_theta is taken w.r.t. these while the
    # model's own (frozen) parameters stay untouched.
    return {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}


def _live_points(params: Mapping[str, Tensor], point: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Leaves that require grad at ``point`` (same names as ``params``): grad_theta is taken there."""
    if set(point) != set(params):
        raise ValueError("gradient point: its parameter names differ from the model's")
    return {k: (point[k] if point[k] is params[k] else
                point[k].detach().to(params[k].device, params[k].dtype).requires_grad_(True)) for k in params}


def kkt_terms(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    lam: Tensor | None,
    *,
    distance: str = "l1",
    primal: str = "ce",
    target: Mapping[str, Tensor] | None = None,
    stat_idx: Tensor | None = None,
    at: Sequence[Mapping[str, Tensor]] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(L_primal, L_stat) from ONE forward pass; L_stat is None when ``lam`` is None.

    ``target``: what -sum_i lam_i grad L_i must reach (per parameter name); default theta*
    itself (the paper's Eq. 3). ``stationarity_target`` builds the alternatives.
    ``stat_idx`` (APPROXIMATION, ``DistillConfig.stat_candidates``): the stationarity sum runs
    over these candidates only, scaled by N / m (an unbiased estimate of the full sum; cosine
    ignores the scale); the primal still covers every candidate. The others take a plain
    forward (no double-backward graph), which is where the time goes.
    ``at`` (``stationarity_points``): the parameter sets where the inner gradients are taken,
    averaged over the sets; the primal stays at theta*. None: theta* (one shared forward)."""
    _check_xy(x, y)
    if distance not in STAT_DISTANCES:
        raise ValueError(f"stationarity distance must be one of {list(STAT_DISTANCES)}, got {distance!r}")
    if lam is None:
        logits = model(x)
        return _per_sample_primal(logits, y, primal).mean(), None
    _check_lam(lam, x.shape[0])
    params = _live_params(model)
    n = x.shape[0]
    scale = 1.0
    if stat_idx is not None and stat_idx.numel() < n:
        if stat_idx.dim() != 1 or stat_idx.numel() == 0:
            raise ValueError(f"stat_idx must be a non-empty 1-D index tensor, got shape {tuple(stat_idx.shape)}")
        keep = torch.zeros(n, dtype=torch.bool, device=x.device)
        keep[stat_idx.to(x.device)] = True
        rest = (~keep).nonzero().flatten()
        sub = keep.nonzero().flatten()
        # Per-sample model (instance norm / eval mode), so the split forward equals the full one.
        if at is None:
            logits = functional_call(model, params, (x[sub],))
            per_sample = torch.cat([_per_sample_primal(logits, y[sub], primal),
                                    _per_sample_primal(model(x[rest]), y[rest], primal)])
            l_primal = per_sample.mean()
        else:
            l_primal = _per_sample_primal(model(x), y, primal).mean()
        x_stat, y, lam, scale = x[sub], y[sub], lam[sub], n / sub.numel()
    else:
        x_stat = x
        if at is None:
            logits = functional_call(model, params, (x,))
            l_primal = _per_sample_primal(logits, y, primal).mean()
        else:
            l_primal = _per_sample_primal(model(x), y, primal).mean()
    # sum_i lam_i grad L_i = grad sum_i lam_i L_i: one weighted backward per point, kept in the graph.
    if at is None:
        ce = F.cross_entropy(logits, y, reduction="none")
        grads = torch.autograd.grad(scale * (lam * ce).sum(), list(params.values()), create_graph=True)
    else:
        if not at:
            raise ValueError("at must hold at least one gradient point")
        total: list[Tensor] | None = None
        for point in at:
            live = _live_points(params, point)
            ce = F.cross_entropy(functional_call(model, live, (x_stat,)), y, reduction="none")
            g = torch.autograd.grad(scale * (lam * ce).sum() / len(at), list(live.values()), create_graph=True)
            total = list(g) if total is None else [a + b for a, b in zip(total, g)]
        grads = tuple(total)  # type: ignore[arg-type]
    v = {k: -g for k, g in zip(params, grads)}
    theta = {k: p.detach() for k, p in params.items()} if target is None else target
    return l_primal, _distance(theta, v, distance)


def primal_loss(model: nn.Module, x: Tensor, y: Tensor, *, mode: str = "ce") -> Tensor:
    """Eq. 3 primal term: mean cross-entropy of Phi(x_i; theta*) against y_i
    (``mode="hinge"``: DSV Eq. 7, correctly classified samples contribute 0)."""
    return kkt_terms(model, x, y, None, primal=mode)[0]


def stationarity_loss(
    model: nn.Module, x: Tensor, y: Tensor, lam: Tensor, *, distance: str = "l1"
) -> Tensor:
    """Eq. 3 stationarity term D(theta*, -sum_i lam_i grad_theta CE(Phi(x_i; theta*), y_i)).

    Differentiable w.r.t. ``x`` and ``lam`` (double backward). ``lam`` (shape (N,))
    must be >= 0.
    """
    stat = kkt_terms(model, x, y, lam, distance=distance)[1]
    assert stat is not None
    return stat


def dkkt_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    lam: Tensor,
    *,
    alpha: float,
    dsa_params: DSAParams | None = None,
    aug_weight: float = DEFAULT_AUG_WEIGHT,
    distance: str = "l1",
    primal: str = "ce",
    target: Mapping[str, Tensor] | None = None,
    passes: str = "both",
    stat_idx: Tensor | None = None,
    at: Sequence[Mapping[str, Tensor]] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 4 with DSV's manifold (augmentation) condition.

    Returns ``(loss, terms)``. Without ``dsa_params`` (or ``aug_weight == 0``):
    loss = L_primal(x) + alpha L_stat(x). With them:
    loss = [L_kkt(x) + aug_weight * L_kkt(A(x))] / (1 + aug_weight), A = ``apply_dsa``.
    ``passes`` (with ``dsa_params`` and ``aug_weight > 0``): "both" (the above, exact),
    "clean" = L_kkt(x) only or "aug" = L_kkt(A(x)) only. Drawing "aug" with probability
    aug_weight / (1 + aug_weight) (``synthesize`` under ``DistillConfig.aug_passes =
    "sample"``) gives an UNBIASED one-pass estimate of the two-pass loss at half its cost.
    ``stat_idx`` / ``at``: see ``kkt_terms`` (stationarity over a candidate subset / where its
    inner gradients are taken).
    ``terms`` holds the raw terms "primal", "stat" and, when augmented, "primal_aug",
    "stat_aug", plus the two weighted parts whose sum is ``loss``: "primal_part" (the
    primal terms with their augmentation weighting) and "stat_part" (alpha times the
    stationarity terms, likewise); all scalar tensors still attached to the graph.
    """
    if alpha < 0 or aug_weight < 0:
        raise ValueError(f"alpha and aug_weight must be >= 0, got alpha={alpha}, aug_weight={aug_weight}")
    if passes not in AUG_PASSES[:1] + ("clean", "aug"):
        raise ValueError(f"passes must be 'both', 'clean' or 'aug', got {passes!r}")
    if passes != "both" and dsa_params is not None and aug_weight > 0:
        xa = apply_dsa(x, dsa_params) if passes == "aug" else x
        p, s = kkt_terms(model, xa, y, lam, distance=distance, primal=primal, target=target, stat_idx=stat_idx,
                         at=at)
        assert s is not None
        return p + alpha * s, {"primal": p, "stat": s, "primal_part": p, "stat_part": alpha * s,
                               "aug_pass": p.new_tensor(float(passes == "aug"))}
    p, s = kkt_terms(model, x, y, lam, distance=distance, primal=primal, target=target, stat_idx=stat_idx, at=at)
    assert s is not None
    terms: dict[str, Tensor] = {"primal": p, "stat": s}
    primal_part, stat_part = p, alpha * s
    if dsa_params is not None and aug_weight > 0:
        pa, sa = kkt_terms(model, apply_dsa(x, dsa_params), y, lam, distance=distance, primal=primal,
                           target=target, stat_idx=stat_idx, at=at)
        assert sa is not None
        terms["primal_aug"], terms["stat_aug"] = pa, sa
        primal_part = (p + aug_weight * pa) / (1.0 + aug_weight)
        stat_part = alpha * (s + aug_weight * sa) / (1.0 + aug_weight)
    terms["primal_part"], terms["stat_part"] = primal_part, stat_part
    return primal_part + stat_part, terms
