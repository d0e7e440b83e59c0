"""Can data satisfy the stationarity condition?  cos(target, -sum_i lambda_i grad_theta L_i).

L_stat pushes synthetic images towards a set whose weighted loss gradients point along the
stationarity target (theta* - theta_0, or theta*). This module measures how close a set of images
comes to that, with the gradients taken at points theta_t = theta_0 + t (theta* - theta_0) of the
straight path from the network FedAvg started from (t = 0) to theta* (t = 1):

- ``uniform``: lambda_i = 1 for every image (the plain gradient sum);
- ``lambda``: the multipliers a distillation learned (synthetic sets);
- ``nnls``: the best lambda >= 0, from non-negative least squares on the Gram matrix of the
  per-sample gradients. For a convex cone {sum_i lambda_i v_i : lambda >= 0} the projection p of
  the target b satisfies <b - p, p> = 0, so cos(b, p) = ||p|| / ||b|| is the largest cosine any
  non-negative weighting reaches: NNLS gives the best case, not a heuristic one.

Each is reported at every path point and for the mean gradient over the path (``path_mean``,
what ``distill.stat_at: path`` optimises). Everything is taken in eval mode with the model's own
buffers; the per-sample gradients come from ``torch.func`` (vmap of grad), in chunks.

``nnls_gram`` is an active-set (Lawson-Hanson) solver in torch (float64, CPU): scipy is not a
dependency of the project.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["path_ts", "path_point", "summed_gradient", "per_sample_gradients", "nnls_gram", "gram_cosine",
           "diagnose", "DIAGNOSTIC_COLUMNS", "markdown_table"]

DIAGNOSTIC_COLUMNS = ("set", "weights", "n", "at", "cos")


def path_ts(points: int) -> list[float]:
    """``points`` evenly spaced t in [0, 1], both ends included; 1 point = theta* alone (t = 1)."""
    if not isinstance(points, int) or points < 1:
        raise ValueError(f"path points must be an int >= 1, got {points!r}")
    return [1.0] if points == 1 else [i / (points - 1) for i in range(points)]


def path_point(theta: Mapping[str, Tensor], theta0: Mapping[str, Tensor] | None, t: float) -> dict[str, Tensor]:
    """theta_0 + t (theta* - theta_0); theta* itself without theta_0 (only t = 1 is defined then)."""
    if theta0 is None:
        if t != 1.0:
            raise ValueError(f"path point t={t} needs theta_0")
        return {k: v.detach() for k, v in theta.items()}
    if set(theta0) != set(theta):
        raise ValueError("theta_0's parameter names differ from theta*'s")
    return {k: (theta0[k] + t * (theta[k] - theta0[k])).detach() for k in theta}


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def summed_gradient(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor,
                    weights: Tensor | None = None, batch: int = 256) -> Tensor:
    """Flattened sum_i w_i grad_theta CE(Phi(x_i; params), y_i) (w = 1 without ``weights``), in batches."""
    live = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    total = torch.zeros(sum(p.numel() for p in live.values()), dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], batch):
        xb, yb = x[start:start + batch], y[start:start + batch]
        ce = F.cross_entropy(functional_call(model, live, (xb,)), yb, reduction="none")
        w = torch.ones_like(ce) if weights is None else weights[start:start + batch].to(ce)
        total += _flat(torch.autograd.grad((w * ce).sum(), list(live.values()))).float()
    return total


def per_sample_gradients(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor,
                         chunk: int = 32) -> Tensor:
    """(n, P): row i = flattened grad_theta CE(Phi(x_i; params), y_i) (``torch.func.vmap`` of ``grad``)."""
    fixed = {k: p.detach() for k, p in params.items()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per = vmap(grad(loss), in_dims=(None, 0, 0))
    rows = []
    for start in range(0, x.shape[0], chunk):
        g = per(fixed, x[start:start + chunk], y[start:start + chunk])
        rows.append(torch.cat([g[k].reshape(g[k].shape[0], -1) for k in fixed], dim=1).float())
    return torch.cat(rows) if rows else torch.zeros(0, sum(p.numel() for p in fixed.values()))


def nnls_gram(gram: Tensor, h: Tensor, max_iter: int | None = None, tol: float | None = None) -> Tensor:
    """argmin_{lambda >= 0} 1/2 lambda^T G lambda - h^T lambda, i.e. NNLS min ||A lambda - b|| given
    only G = A^T A and h = A^T b (Lawson & Hanson's active-set method, float64 on the CPU).

    Terminates: every outer step adds the coordinate with the largest positive gradient of the
    objective to the passive set, the inner loop steps back to the feasible boundary whenever the
    unconstrained solution on that set leaves the orthant. ``max_iter`` (default 3 n) bounds the
    outer steps of an ill-conditioned Gram matrix."""
    G = gram.detach().to("cpu", torch.float64)
    h = h.detach().to("cpu", torch.float64).reshape(-1)
    n = h.numel()
    if G.shape != (n, n):
        raise ValueError(f"gram must be {n}x{n} to match h, got {tuple(G.shape)}")
    if not (torch.isfinite(G).all() and torch.isfinite(h).all()):
        raise ValueError("nnls_gram: the Gram matrix or h is not finite")
    lam = torch.zeros(n, dtype=torch.float64)
    if n == 0:
        return lam
    scale = float(G.abs().max()) or 1.0
    tol = tol if tol is not None else 1e-12 * scale * n
    passive = torch.zeros(n, dtype=torch.bool)
    w = h - G @ lam
    for _ in range(max_iter if max_iter is not None else 3 * n):
        free = ~passive
        if not bool(free.any()) or float(w[free].max()) <= tol:
            break
        j = int(torch.where(free, w, torch.full_like(w, -math.inf)).argmax())
        passive[j] = True
        for _inner in range(3 * n):
            z = torch.zeros_like(lam)
            idx = passive.nonzero().flatten()
            sub = G[idx][:, idx]
            # lstsq: a rank-deficient passive set (collinear gradients) still gets a minimum-norm solution
            z[idx] = torch.linalg.lstsq(sub, h[idx].unsqueeze(1), driver="gelsd").solution.flatten()
            if bool((z[idx] > 0).all()):
                lam = z
                break
            bad = (passive & (z <= 0)).nonzero().flatten()
            ratios = lam[bad] / (lam[bad] - z[bad])
            step = float(ratios.min())
            lam = lam + step * (z - lam)
            lam[bad[ratios.argmin()]] = 0.0  # the coordinate that reached the boundary leaves the passive set
            passive &= lam > 0
            lam[~passive] = 0.0
            if not bool(passive.any()):
                break
        w = h - G @ lam
    return lam.clamp_min(0.0)


def gram_cosine(gram: Tensor, h: Tensor, target_norm: float, lam: Tensor) -> float:
    """cos(b, A lambda) = h^T lambda / (||b|| sqrt(lambda^T G lambda)) from the Gram quantities."""
    G, h, lam = (t.detach().to("cpu", torch.float64) for t in (gram, h, lam))
    norm = math.sqrt(max(float(lam @ G @ lam), 0.0))
    if norm <= 0 or target_norm <= 0:
        return 0.0
    return float(h @ lam) / (target_norm * norm)


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return 0.0 if na <= 0 or nb <= 0 else float((a.double() @ b.double()) / (na * nb))


def diagnose(model: nn.Module, init: nn.Module | None, target: Mapping[str, Tensor],
             sets: Mapping[str, tuple[Tensor, Tensor, Tensor | None]], points: int = 5,
             nnls_samples: int = 100, batch: int = 256) -> list[dict[str, Any]]:
    """Rows (``DIAGNOSTIC_COLUMNS``) of cos(target, -sum_i lambda_i grad L_i) for every named set.

    ``sets``: name -> (x normalized, y, lambda or None). ``target``: what the stationarity sum
    must reach (``common.distill.dkkt.stationarity_target``). ``init``: theta_0 (None: only theta*
    is a gradient point). Per set: ``uniform`` over all its images, ``lambda`` (when given) and
    ``nnls`` over ``nnls_samples`` of its images (0: no NNLS; evenly strided, so a class-major set
    keeps every class), at each of ``points`` path points (``path_ts``) and, with more than one
    point, for the mean gradient over them. Memory: two (nnls_samples x parameters) float32 blocks."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    theta = {k: p.detach() for k, p in model.named_parameters()}
    theta0 = None if init is None else {k: p.detach().to(theta[k]) for k, p in init.named_parameters()}
    ts = path_ts(points) if theta0 is not None else [1.0]
    b = _flat([target[k] for k in theta]).float()
    b_norm = float(b.norm())
    rows: list[dict[str, Any]] = []
    for name, (x, y, lam) in sets.items():
        if x.shape[0] == 0:
            continue
        x = x.to(b.device, torch.float32)
        y = y.to(b.device)
        m = min(int(nnls_samples), x.shape[0])
        sub = torch.linspace(0, x.shape[0] - 1, m).round().long().to(x.device) if m > 0 else None
        uniform_mean = torch.zeros_like(b)
        lam_mean = torch.zeros_like(b)
        per_mean = None
        for t in ts:
            params = path_point(theta, theta0, t)
            at = f"{t:.2f}"
            g = summed_gradient(model, params, x, y, batch=batch)
            uniform_mean += g / len(ts)
            rows.append({"set": name, "weights": "uniform", "n": x.shape[0], "at": at, "cos": _cos(b, -g)})
            if lam is not None:
                gl = summed_gradient(model, params, x, y, weights=lam, batch=batch)
                lam_mean += gl / len(ts)
                rows.append({"set": name, "weights": "lambda", "n": x.shape[0], "at": at, "cos": _cos(b, -gl)})
            if m > 0:
                per = per_sample_gradients(model, params, x[sub], y[sub])
                per_mean = per / len(ts) if per_mean is None else per_mean + per / len(ts)
                rows.append({"set": name, "weights": "nnls", "n": m, "at": at, "cos": _nnls_cos(per, b, b_norm)})
        if len(ts) > 1:
            rows.append({"set": name, "weights": "uniform", "n": x.shape[0], "at": "path_mean",
                         "cos": _cos(b, -uniform_mean)})
            if lam is not None:
                rows.append({"set": name, "weights": "lambda", "n": x.shape[0], "at": "path_mean",
                             "cos": _cos(b, -lam_mean)})
            if per_mean is not None:
                rows.append({"set": name, "weights": "nnls", "n": m, "at": "path_mean",
                             "cos": _nnls_cos(per_mean, b, b_norm)})
    return rows


def _nnls_cos(per: Tensor, b: Tensor, b_norm: float) -> float:
    """The best cosine of -sum_i lambda_i g_i (lambda >= 0) with b, the rows of ``per`` being the g_i."""
    # the columns of A are -g_i (the combination the stationarity term builds): G = g g^T, h = -g b
    gram, h = (per @ per.T).double(), -(per @ b).double()
    return gram_cosine(gram, h, b_norm, nnls_gram(gram, h))


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per (set, weights), one column per gradient point (t = 0: theta_0, t = 1: theta*)."""
    rows = [r for r in rows if isinstance(r, Mapping) and all(k in r for k in DIAGNOSTIC_COLUMNS)
            and isinstance(r["cos"], (int, float)) and isinstance(r["n"], int)]  # a record read back: skip junk
    points: list[str] = []
    for r in rows:
        if r["at"] not in points:
            points.append(str(r["at"]))
    keys: list[tuple[str, str, int]] = []
    cell: dict[tuple[str, str, int], dict[str, float]] = {}
    for r in rows:
        key = (str(r["set"]), str(r["weights"]), int(r["n"]))
        if key not in cell:
            keys.append(key)
            cell[key] = {}
        cell[key][str(r["at"])] = float(r["cos"])
    head = ["images", "lambda", "n"] + [f"t = {p}" if p != "path_mean" else "path mean" for p in points]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        vals = [f"{cell[key][p]:.3f}" if p in cell[key] else "" for p in points]
        lines.append("| " + " | ".join([key[0], key[1], str(key[2])] + vals) + " |")
    return lines
