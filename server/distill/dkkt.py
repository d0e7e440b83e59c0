"""Deep-KKT loss (paper Eq. 3-4) built on the DeepKKT conditions of Deep Support Vectors
(Lee, Lee, Hwang & Kwak, "Deep Support Vectors", NeurIPS 2024, arXiv 2403.17329).

For candidates X = {(x_i, y_i, lambda_i)} and the frozen trained model Phi(.; theta*):

    L_primal = 1/n sum_i L(Phi(x_i; theta*), y_i)                             (Eq. 3)
    L_stat   = D(theta*, -sum_i lambda_i grad_theta L(Phi(x_i; theta*), y_i))   (Eq. 3)
    L_kkt    = L_primal + alpha * L_stat                                         (Eq. 4)

Choices, and where they come from
- D (``distance``): default ``"l1"`` = mean over ALL parameters of |theta* - v|.
  Source: DSV paper, Sec. 4.2 ("we have chosen to use the l1 distance to suppress the
  effect of outliers") and App. D ("we averaged the distance per parameter").
  Note that l1 is NOT scale-blind: lambda has to reach the scale of theta*, and while
  it does not, the stationarity gradient pushes x towards larger loss gradients, i.e.
  towards the decision boundary (what support vectors are). Also offered:
  ``"l2"`` = mean squared difference (DSV Alg. 1 writes a squared l2 norm) and
  ``"cosine"`` = 1 - cos(theta*, v) (scale-blind, only the direction must match;
  the DESIGN.md fallback).
- L (the per-sample loss inside the gradient) is cross-entropy (DSV Sec. 4.2).
- Primal (``primal``): default ``"ce"`` = mean cross-entropy, exactly Eq. 3 of the
  practical-DD paper. ``"hinge"`` = DSV Eq. 7: a sample that the model already
  classifies correctly contributes 0, a misclassified one its cross-entropy.
- The gradient sum_i lambda_i grad L_i equals grad of sum_i lambda_i L_i, so ONE
  weighted backward (``torch.autograd.grad`` with ``create_graph=True`` through
  ``torch.func.functional_call``) gives it; no per-sample gradients. L_stat then
  differentiates back to x and lambda (double backward).
- lambda >= 0 (dual feasibility) is the caller's job: these functions take lambda
  itself and reject negative entries. DSV Alg. 1 drops a candidate whose lambda turns
  negative; with a fixed-size synthetic set ``synthesize`` instead projects lambda back
  onto lambda >= 0 after every step (a candidate at lambda = 0 leaves the stationarity
  sum but may re-enter), see ``server/distill/synthesize.py``.
- Manifold condition (``dkkt_loss``): DSV Eq. 9 / Alg. 1 require the KKT conditions to
  hold for augmented candidates too: L = L_kkt(x) + eta * L_kkt(A(x)) with eta = 5
  (DSV App. D). We use the project's DSA for A (one draw per call) and divide by
  (1 + eta) so that alpha and the paper's gamma keep the scale of Eq. 4-5 (which
  has no augmentation term). DSV's total-variation / norm priors are left out: DSV
  sets their weights to 0 for dataset distillation (App. D).
- theta* are the model's parameters (not buffers). The model is used as given (callers
  put it in eval mode); its own parameters need not require grad.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from common.augment import DSAParams, apply_dsa

__all__ = [
    "STAT_DISTANCES",
    "stat_at_zero",
    "stationarity_target",
    "lambda_scale",
    "PRIMAL_MODES",
    "DEFAULT_AUG_WEIGHT",
    "primal_loss",
    "stationarity_loss",
    "kkt_terms",
    "dkkt_loss",
]

STAT_DISTANCES: tuple[str, ...] = ("l1", "l2", "cosine")
PRIMAL_MODES: tuple[str, ...] = ("ce", "hinge")
DEFAULT_AUG_WEIGHT = 5.0  # eta of DSV Alg. 1 / App. D


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


def stat_at_zero(target: Mapping[str, Tensor], distance: str = "l1") -> float:
    """D(target, 0): L_stat when every lambda is 0 (or every gradient vanishes), the value
    an inert stationarity term sits at; 1 for cosine."""
    zero = {k: torch.zeros_like(t) for k, t in target.items()}
    return float(_distance(dict(target), zero, distance))


def lambda_scale(model: nn.Module, x: Tensor, y: Tensor, target: Mapping[str, Tensor] | None = None) -> float:
    """The common multiplier s >= 0 that brings -s * sum_i grad L_i closest to theta* in l2
    (least squares: s = <theta*, v> / ||v||^2 with v = -sum_i grad L_i, or ``target`` in place
    of theta*; when the two point
    apart, ||theta*|| / ||v|| so that at least the norms agree). Used to start lambda at
    the scale of theta* instead of 1: per-sample gradients of a trained model are tiny, so
    lambda = 1 leaves sum_i lambda_i grad L_i orders of magnitude short of theta*."""
    _check_xy(x, y)
    params = _live_params(model)
    ce = F.cross_entropy(functional_call(model, params, (x.detach(),)), y, reduction="sum")
    grads = torch.autograd.grad(ce, list(params.values()))
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


def kkt_terms(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    lam: Tensor | None,
    *,
    distance: str = "l1",
    primal: str = "ce",
    target: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(L_primal, L_stat) from ONE forward pass; L_stat is None when ``lam`` is None.

    ``target``: what -sum_i lam_i grad L_i must reach (per parameter name); default theta*
    itself (the paper's Eq. 3). ``stationarity_target`` builds the alternatives."""
    _check_xy(x, y)
    if distance not in STAT_DISTANCES:
        raise ValueError(f"stationarity distance must be one of {list(STAT_DISTANCES)}, got {distance!r}")
    if lam is None:
        logits = model(x)
        return _per_sample_primal(logits, y, primal).mean(), None
    _check_lam(lam, x.shape[0])
    params = _live_params(model)
    logits = functional_call(model, params, (x,))
    l_primal = _per_sample_primal(logits, y, primal).mean()
    # sum_i lam_i grad L_i = grad sum_i lam_i L_i: one weighted backward, kept in the graph.
    ce = F.cross_entropy(logits, y, reduction="none")
    grads = torch.autograd.grad((lam * ce).sum(), list(params.values()), create_graph=True)
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
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 4 with DSV's manifold (augmentation) condition.

    Returns ``(loss, terms)``. Without ``dsa_params`` (or ``aug_weight == 0``):
    loss = L_primal(x) + alpha L_stat(x). With them:
    loss = [L_kkt(x) + aug_weight * L_kkt(A(x))] / (1 + aug_weight), A = ``apply_dsa``.
    ``terms`` holds the raw terms "primal", "stat" and, when augmented, "primal_aug",
    "stat_aug", plus the two weighted parts whose sum is ``loss``: "primal_part" (the
    primal terms with their augmentation weighting) and "stat_part" (alpha times the
    stationarity terms, likewise); all scalar tensors still attached to the graph.
    """
    if alpha < 0 or aug_weight < 0:
        raise ValueError(f"alpha and aug_weight must be >= 0, got alpha={alpha}, aug_weight={aug_weight}")
    p, s = kkt_terms(model, x, y, lam, distance=distance, primal=primal, target=target)
    assert s is not None
    terms: dict[str, Tensor] = {"primal": p, "stat": s}
    primal_part, stat_part = p, alpha * s
    if dsa_params is not None and aug_weight > 0:
        pa, sa = kkt_terms(model, apply_dsa(x, dsa_params), y, lam, distance=distance, primal=primal,
                           target=target)
        assert sa is not None
        terms["primal_aug"], terms["stat_aug"] = pa, sa
        primal_part = (p + aug_weight * pa) / (1.0 + aug_weight)
        stat_part = alpha * (s + aug_weight * sa) / (1.0 + aug_weight)
    terms["primal_part"], terms["stat_part"] = primal_part, stat_part
    return primal_part + stat_part, terms
