"""Synthesize a distilled set S from the trained model theta* and the safe set T'.

    L_total(S) = L_DKKT(S) + gamma * L_DM(S)        (paper Eq. 5; L_DKKT = Eq. 4)

Methods: ``common/methods.py`` is the registry (what each method needs, its terms of Eq. 5,
its start and DM weight); this module asks it.
- ``dm``: pure DM loss (Eq. 2, weight 1), the DM reference recipe.
- ``dsv``: DKKT only, started from noise. ``dsv_real``: DKKT only, started from real images.
- ``dkkt_dm``: the paper's Eq. 5 (``total_loss``).
- ``blend``: paper Fig. 3, pixel average of DSVs (given as ``dsv_x``, or extracted here
  with ``dsv`` when a model is given) and DM images.
- ``dm_from_dsv``: DM (weight 1) started from the DSVs (given or extracted like blend)
  instead of real/noise images: the no-model-access mode's second way to combine them.
- ``random_real``: ipc random safe images per class. ``safe_all``: all of T' (pipc per class).

Defaults from the paper's appendix A (resolved in ``common/config.py``), each overridable in ``DistillConfig``:
alpha = 0.1 / 0.01 / 0.001 for pipc <= 10 / <= 50 / more (``default_alpha``);
gamma = 0.01 for ipc >= 50, else 0.001 (``default_gamma``); init noise for ipc 1, real
safe images otherwise (``default_init``). With ``init="auto"`` every method of a grid that
takes its start from the config (dm, dkkt_dm, blend) starts from the same images (appendix
A's rule by ipc), so a comparison between them differs in the loss alone; ``dsv`` starts from
noise, ``dsv_real`` from real images, ``dm_reference`` (the DM reference recipe, main_DM.py)
from real images with SGD(lr_img, momentum_img).

The loop: S (and lambda) are the only trainable tensors. Images: ``img_optimizer`` (SGD
(lr_img, momentum_img) or Adam(lr_img_adam); "auto" is SGD for dm and Adam for the DKKT
methods, which confounds a dm-vs-dkkt_dm comparison: a comparison gives every method the
same search, scenarios/tune.py, and its picks in ``distill.method_settings``). lambda = exp(rho) with its own Adam
(lr_lambda), see common/distill/dkkt.py for the formulation and its evidence. Every
``log_every`` iterations the loss history records each term, L_stat / D(target, 0),
lambda's min / mean / max / count at 0 and each weighted term's share of the image
gradient (server/sweep/loss_trace.py draws them).
Every iteration draws a fresh random embedding network psi (``embed_factory``), a real
batch of up to ``real_batch`` safe images per class and one DSA draw per class (shared
by the real and synthetic images of that class), all from one CPU ``torch.Generator``
seeded with ``seed`` (no global RNG). Non-finite loss terms or gradients raise
``DistillationError`` (iteration + term names) BEFORE the step, so S stays the last
good state; that state is checkpointed when a checkpoint path is given.

pipc: if T' holds more than ``pipc`` images of a class, ``safe_draw`` picks which: ``random``
(default) a seeded random draw per distillation seed, so seeds vary the safe images a user
cannot choose (one permutation per class and seed, so a smaller pipc is a subset of a larger
one for the same seed); ``first`` the first ``pipc`` in stored order for every seed.
"""

from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from common.augment import sample_dsa_params
from common.config import INITS, DistillConfig, default_alpha, default_gamma, default_init, profile_value
from common.methods import REGISTRY, spec
from common.models import build_model
from common.atomic import atomic_torch_save
from common.distill.dkkt import dkkt_loss, lambda_scale, stat_at_zero, stationarity_points, stationarity_target
from common.distill.stationarity import diagnose
from common.distill.dm import class_indices, dm_loss, sample_real_batches
from common.progress import make_progress

__all__ = [
    "INITS",
    "DistillConfig",
    "SyntheticSet",
    "DistillationError",
    "default_alpha",
    "default_gamma",
    "default_init",
    "make_embed_factory",
    "synthesize",
    "total_loss",
]

class DistillationError(RuntimeError):
    """A loss term or gradient became NaN/Inf; ``iteration`` and ``terms`` say where."""

    def __init__(self, message: str, iteration: int, terms: list[str], checkpoint: Path | None = None):
        super().__init__(message)
        self.iteration = iteration
        self.terms = terms
        self.checkpoint = checkpoint

    def __reduce__(self) -> tuple:  # survives pickling, e.g. back from a sweep worker process (server/sweep/cell_pool.py)
        return (type(self), (str(self), self.iteration, self.terms, self.checkpoint))


@dataclass
class SyntheticSet:
    x: Tensor  # normalized float32, CPU, N×C×H×W, class-major (ipc images of class 0, then 1, ...)
    y: Tensor  # int64, CPU
    method: str
    ipc: int
    info: dict[str, Any] = field(default_factory=dict)


def _embed_net(meta: Any, arch: Mapping[str, Any] | None, generator: torch.Generator) -> nn.Module:
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return build_model(meta, arch, seed=seed)


def make_embed_factory(meta: Any, arch: Mapping[str, Any] | None = None) -> Callable[[torch.Generator], nn.Module]:
    """``embed_factory`` for ``synthesize``: a fresh ConvNet seeded from the generator (picklable,
    so a sweep worker process can take it)."""
    return functools.partial(_embed_net, meta, dict(arch) if arch is not None else None)


# --------------------------------------------------------------------------- safe pool


@dataclass
class _SafePool:
    x: Tensor  # on the working device: float32 (normalized), or uint8 with ``norm`` set
    idx: list[Tensor]  # per class, CPU int64 indices into x
    counts: list[int]
    # uint8 -> normalized float32, applied to each drawn batch (a uint8 pool is 4x smaller)
    norm: Callable[[Tensor], Tensor] | None = None

    @staticmethod
    def build(safe_x: Tensor, safe_y: Tensor, num_classes: int, image_shape: tuple[int, int, int],
              pipc: int, device: torch.device,
              norm: Callable[[Tensor], Tensor] | None = None,
              draw: torch.Generator | None = None) -> "_SafePool":
        if not isinstance(safe_x, Tensor) or not isinstance(safe_y, Tensor):
            raise ValueError("safe_x and safe_y must be tensors")
        if safe_x.dtype == torch.uint8 and norm is None:
            raise ValueError("uint8 safe_x needs safe_normalize (e.g. lambda x: common.datasets.normalize(x, meta))")
        if not safe_x.is_floating_point() and safe_x.dtype != torch.uint8:
            raise ValueError(f"safe_x must be normalized float images, got dtype {safe_x.dtype} (use common.datasets.normalize)")
        if safe_x.is_floating_point():
            norm = None
        if safe_x.dim() != 4 or tuple(safe_x.shape[1:]) != tuple(image_shape):
            raise ValueError(f"safe_x must be N×{'×'.join(map(str, image_shape))}, got {tuple(safe_x.shape)}")
        if safe_y.shape != (safe_x.shape[0],) or safe_y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"safe_y must be int64 of shape ({safe_x.shape[0]},), got {safe_y.dtype} {tuple(safe_y.shape)}")
        if safe_y.numel() and (int(safe_y.min()) < 0 or int(safe_y.max()) >= num_classes):
            raise ValueError(f"safe_y labels must lie in [0, {num_classes}), got [{int(safe_y.min())}, {int(safe_y.max())}]")
        per_class = class_indices(safe_y, num_classes)
        if draw is not None:  # a seeded draw of pipc per class (a prefix of one permutation: nested in pipc)
            per_class = [i[torch.randperm(i.numel(), generator=draw)] for i in per_class]
        idx = [i[:pipc] for i in per_class]
        keep = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
        x = safe_x[keep].to(device=device, dtype=torch.uint8 if norm is not None else torch.float32)
        # re-index into the compacted tensor
        out, start = [], 0
        for i in idx:
            out.append(torch.arange(start, start + i.numel()))
            start += i.numel()
        return _SafePool(x=x, idx=out, counts=[i.numel() for i in idx], norm=norm)

    def rows(self, index: Tensor | None = None) -> Tensor:
        """Normalized float32 images at ``index`` (all of them for None)."""
        x = self.x if index is None else self.x[index.to(self.x.device)]
        return x if self.norm is None else self.norm(x)

    def pick(self, ipc: int, generator: torch.Generator) -> Tensor:
        """ipc random images of every class, class-major (caller checked the counts)."""
        chosen = [i[torch.randperm(i.numel(), generator=generator)[:ipc]] for i in self.idx]
        return self.rows(torch.cat(chosen))

    def short_classes(self, ipc: int) -> list[int]:
        return [c for c, n in enumerate(self.counts) if n < ipc]


def safe_draw_seed(seed: int) -> int:
    """Seed of a cell's safe-image draw: its own stream, independent of the loop's generator."""
    return (int(seed) * 1_000_003 + 0x5AFE) % (2**63)


def total_loss(parts: Mapping[str, Tensor]) -> Tensor:
    """Paper Eq. 5: L_total = L_primal + alpha L_stat + gamma L_DM, given its weighted parts
    ("primal", "stat" from ``dkkt_loss`` and "dm" = gamma L_DM; a method uses a subset)."""
    if not parts:
        raise ValueError("total_loss: no loss terms (the method uses neither DKKT nor DM)")
    return sum(parts.values(), next(iter(parts.values())).new_zeros(()))


def _labels(num_classes: int, ipc: int) -> Tensor:
    return torch.arange(num_classes, dtype=torch.int64).repeat_interleave(ipc)


# --------------------------------------------------------------------------- main entry


def synthesize(
    method: str,
    *,
    ipc: int,
    num_classes: int,
    image_shape: tuple[int, int, int],
    pipc: int,
    safe_x: Tensor | None,
    safe_y: Tensor | None,
    model: nn.Module | None,
    embed_factory: Callable[[torch.Generator], nn.Module] | None,
    config: DistillConfig,
    seed: int,
    device: torch.device | str,
    progress: bool = True,
    checkpoint_path: Path | str | None = None,
    dsv_x: Tensor | None = None,
    dsv_y: Tensor | None = None,
    init_model: nn.Module | None = None,
    safe_normalize: Callable[[Tensor], Tensor] | None = None,
) -> SyntheticSet:
    """Distill ``ipc`` images per class with ``method`` (see the module docstring).

    ``safe_x``: normalized float N×C×H×W safe images (T'), ``safe_y`` their labels; or uint8
    images with ``safe_normalize`` (uint8 batch -> normalized float, e.g.
    ``lambda x: common.datasets.normalize(x, meta)``): the pool then stays uint8 (4x less
    memory for a large pool) and each drawn batch is normalized (same values).
    ``model``: trained theta* (not modified; a frozen copy is used). ``embed_factory``:
    generator -> fresh random network whose ``embed`` (or itself) is psi.
    ``dsv_x``/``dsv_y`` (blend only): pre-extracted DSVs, class-major, ipc per class;
    ``dsv_y`` (optional addition) lets them come in any order.
    ``init_model``: the network theta* was trained from (theta_0), needed when
    ``config.stat_target == "update"``.
    Returns a ``SyntheticSet`` on CPU.
    """
    ms = spec(method)  # ValueError for an unknown method
    if not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc must be an int >= 1, got {ipc!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if not isinstance(pipc, int) or pipc < 0:
        raise ValueError(f"pipc must be an int >= 0, got {pipc!r}")
    image_shape = tuple(int(s) for s in image_shape)  # type: ignore[assignment]
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
    config = config.validate().resolved()  # stat_variant 'paper' -> the keys it stands for
    device = torch.device(device)
    if ms.needs_model and model is None:
        raise ValueError(f"method {method!r} needs the trained model (DKKT loss), but model is None")
    if ms.needs_safe and (safe_x is None or safe_y is None):
        raise ValueError(f"method {method!r} needs safe data (safe_x and safe_y), but got None")
    if "dm" in ms.terms and embed_factory is None:
        raise ValueError(f"method {method!r} needs embed_factory (random networks for DM), got None")
    if ms.uses_dsvs and dsv_x is None and model is None:
        raise ValueError(f"method {method!r} needs pre-extracted DSVs (dsv_x) or the model to extract them; both are None")
    if (ms.needs_model or (ms.uses_dsvs and dsv_x is None)) and config.stat_target == "update" \
            and init_model is None:
        raise ValueError("stat_target 'update' needs init_model (the network theta* was trained from), got None")

    t0 = time.monotonic()
    gen = torch.Generator().manual_seed(int(seed))
    pool = None
    if safe_x is not None and safe_y is not None and ms.needs_safe:
        draw = torch.Generator().manual_seed(safe_draw_seed(seed)) if config.safe_draw == "random" else None
        pool = _SafePool.build(safe_x, safe_y, num_classes, image_shape, pipc, device, norm=safe_normalize,
                               draw=draw)
    base_info: dict[str, Any] = {"seed": int(seed), "pipc": pipc, "config": config.engine_dict(),
                                 "safe_per_class": pool.counts if pool else [], "safe_draw": config.safe_draw}

    if method == "safe_all":
        assert pool is not None
        counts = pool.counts
        y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
        info = base_info | {"class_counts": counts, "requested_ipc": ipc, "wall_s": time.monotonic() - t0}
        return SyntheticSet(x=pool.rows().cpu(), y=y, method=method, ipc=max(counts, default=0), info=info)

    if method == "random_real":
        assert pool is not None
        short = pool.short_classes(ipc)
        if short:
            raise ValueError(_short_msg(method, ipc, pipc, pool, short))
        x = pool.pick(ipc, gen)
        info = base_info | {"wall_s": time.monotonic() - t0}
        return SyntheticSet(x=x.cpu(), y=_labels(num_classes, ipc), method=method, ipc=ipc, info=info)

    deadline = None if config.time_budget_s is None else t0 + config.time_budget_s
    with make_progress(progress) as bar:
        run = _Run(ipc=ipc, num_classes=num_classes, image_shape=image_shape, pipc=pipc, pool=pool,
                   model=model, embed_factory=embed_factory, config=config, device=device, bar=bar,
                   init_model=init_model)
        if not ms.uses_dsvs:
            out = run.optimize(method, gen, deadline, _as_path(checkpoint_path))
            out.info = base_info | out.info
            return out

        # blend (Fig. 3): average DSVs and DM images pixel-wise; dm_from_dsv: DM from the DSVs.
        sub_seeds = torch.randint(0, 2**62, (2,), generator=gen).tolist()
        sub_info: dict[str, Any] = {}
        if dsv_x is None:
            dl = None if deadline is None else t0 + config.time_budget_s / 2  # type: ignore[operator]
            dsv = run.optimize("dsv", torch.Generator().manual_seed(sub_seeds[0]), dl,
                               _suffixed(checkpoint_path, "_dsv"))
            dsv_x, sub_info["dsv"] = dsv.x, dsv.info
        else:
            dsv_x = _canonical_dsv(dsv_x, dsv_y, num_classes, ipc, image_shape)
            sub_info["dsv"] = {"source": "given"}
        if method == "dm_from_dsv":
            # DM started from the DSVs instead of real/noise images (no-model-access mode).
            run.init_x = dsv_x.to(torch.float32)
            dm = run.optimize("dm", torch.Generator().manual_seed(sub_seeds[1]), deadline, _as_path(checkpoint_path))
            info = base_info | {"dsv": sub_info["dsv"], "dm": dm.info, "wall_s": time.monotonic() - t0}
            return SyntheticSet(x=dm.x, y=_labels(num_classes, ipc), method=method, ipc=ipc, info=info)
        dm = run.optimize("dm", torch.Generator().manual_seed(sub_seeds[1]), deadline,
                          _suffixed(checkpoint_path, "_dm"))
        x = (dsv_x.to(torch.float32).cpu() + dm.x) / 2.0
        info = base_info | {"dsv": sub_info["dsv"], "dm": dm.info, "wall_s": time.monotonic() - t0}
        return SyntheticSet(x=x, y=_labels(num_classes, ipc), method="blend", ipc=ipc, info=info)


def _as_path(p: Path | str | None) -> Path | None:
    return None if p is None else Path(p)


def _suffixed(p: Path | str | None, suffix: str) -> Path | None:
    if p is None:
        return None
    p = Path(p)
    return p.with_name(p.stem + suffix + p.suffix)


def _short_msg(method: str, ipc: int, pipc: int, pool: _SafePool, short: list[int]) -> str:
    have = ", ".join(f"class {c}: {pool.counts[c]}" for c in short)
    return (f"method {method!r} with real images needs ipc={ipc} safe images of every class, "
            f"but only {have} are available (pipc={pipc}); lower ipc, raise pipc or use init 'noise'")


def _canonical_dsv(dsv_x: Tensor, dsv_y: Tensor | None, num_classes: int, ipc: int,
                   image_shape: tuple[int, int, int]) -> Tensor:
    want = (num_classes * ipc, *image_shape)
    if not isinstance(dsv_x, Tensor) or not dsv_x.is_floating_point() or tuple(dsv_x.shape) != want:
        raise ValueError(f"dsv_x must be normalized float of shape {want} (ipc={ipc} per class), "
                         f"got {getattr(dsv_x, 'dtype', type(dsv_x))} {tuple(getattr(dsv_x, 'shape', ()))}")
    if dsv_y is None:
        return dsv_x
    dsv_y = dsv_y.to("cpu", torch.int64)
    counts = torch.bincount(dsv_y, minlength=num_classes)
    if dsv_y.shape != (want[0],) or counts.numel() != num_classes or bool((counts != ipc).any()):
        raise ValueError(f"dsv_y must hold exactly ipc={ipc} labels of each of {num_classes} classes, "
                         f"got counts {counts.tolist()}")
    return dsv_x[torch.argsort(dsv_y, stable=True)]


# --------------------------------------------------------------------------- optimisation loop


class _MethodLoss:
    """What one method minimises, per iteration: its terms of Eq. 5 with their weights (``parts``)."""

    def __init__(self, run: "_Run", method: str) -> None:
        cfg, ms = run.cfg, REGISTRY[method]
        self.run, self.method = run, method
        self.use_dkkt, self.use_dm = "stat" in ms.terms, "dm" in ms.terms
        self.alpha, self.gamma = cfg.alpha_for(run.pipc), cfg.gamma_for(run.ipc)
        self.dm_weight = 1.0 if ms.dm_weight == "one" else self.gamma
        self.gamma_used = ms.dm_weight == "gamma"
        self.img_optimizer = ms.img_optimizer or (cfg.img_optimizer if cfg.img_optimizer != "auto" else
                                                  ("adam" if self.use_dkkt else "sgd"))
        if self.use_dm:
            assert run.pool is not None and run.embed_factory is not None
            empty = [c for c, n in enumerate(run.pool.counts) if n == 0]
            if empty:
                raise ValueError(f"method {method!r} matches every class's real images, but classes {empty} "
                                 f"have no safe images")

    def parts(self, x: Tensor, y: Tensor, lam: Tensor | None,
              gen: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(every term, for the log; the weighted addends of the loss, whose sum is L_total). The DKKT
        pass draws from ``gen`` before the DM pass, always in this order (the seeded stream)."""
        terms: dict[str, Tensor] = {}
        parts: dict[str, Tensor] = {}
        if self.use_dkkt:
            kt = self._dkkt(x, y, lam, gen)
            parts["primal"], parts["stat"] = kt.pop("primal_part"), kt.pop("stat_part")
            terms.update(kt)
        if self.use_dm:
            terms["dm"] = self._dm(x, gen)
            parts["dm"] = self.dm_weight * terms["dm"]
        return terms, parts

    def _dkkt(self, x: Tensor, y: Tensor, lam: Tensor | None, gen: torch.Generator) -> dict[str, Tensor]:
        """L_primal + alpha L_stat on theta* (common/distill/dkkt.py), clean and augmented (manifold pass)."""
        run, cfg = self.run, self.run.cfg
        assert lam is not None and run.model is not None and run.stat is not None
        p_aug = sample_dsa_params(gen, cfg.dsa_strategy) if cfg.dsa else None
        # The approximations draw from gen only when switched on (default stream unchanged).
        passes = "both"
        if cfg.aug_passes == "sample" and p_aug is not None and cfg.aug_weight > 0:
            u = float(torch.rand((), generator=gen))
            passes = "aug" if u < cfg.aug_weight / (1.0 + cfg.aug_weight) else "clean"
        stat_idx = None
        if 0 < cfg.stat_candidates < y.numel():
            stat_idx = torch.randperm(y.numel(), generator=gen)[:cfg.stat_candidates]
        _, kt = dkkt_loss(run.model, x, y, lam, alpha=self.alpha / run.stat.divisor, dsa_params=p_aug,
                          aug_weight=cfg.aug_weight, distance=cfg.stat_distance, primal=cfg.primal,
                          target=run.target, passes=passes, stat_idx=stat_idx, at=run.stat.points)
        return kt

    def _dm(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """L_DM: class-mean embeddings of S against the safe images under a fresh random network."""
        run, cfg = self.run, self.run.cfg
        net = run.embed_factory(gen).to(run.device).eval()  # type: ignore[misc]
        for p in net.parameters():
            p.requires_grad_(False)
        psi = getattr(net, "embed", net)
        real = sample_real_batches(run.pool.x, run.pool.idx, cfg.real_batch, gen,  # type: ignore[union-attr]
                                   transform=run.pool.norm)  # type: ignore[union-attr]
        params = ([sample_dsa_params(gen, cfg.dsa_strategy, siamese=True) for _ in range(run.C)]
                  if cfg.dsa else None)  # one transform per class, real and synthetic alike
        return dm_loss(psi, real, list(x.split(run.ipc)), params, max_batch=run.dm_max_batch)

    def describe(self) -> dict[str, Any]:
        return {"alpha": self.alpha if self.use_dkkt else None, "gamma": self.gamma if self.gamma_used else None,
                "dm_weight": self.dm_weight if self.use_dm else None}


@dataclass
class _StatSetup:
    points: Any  # where the inner gradients are taken (theta*, theta_0 or the path)
    zero: float  # D(target, 0): L_stat of a stationarity sum of zero
    divisor: float  # L_stat / D(target, 0) under stat_relative, else 1


class _Multipliers:
    """lambda of the stationarity sum: its parametrisation (exp(rho) > 0, or lambda projected onto >= 0),
    its optimizer and its scale; sets the run's stationarity target and points."""

    def __init__(self, run: "_Run", x: Tensor, y: Tensor) -> None:
        cfg, model = run.cfg, run.model
        assert model is not None
        run._check_model(x)
        run.target = stationarity_target(model, run.init_model if cfg.stat_target == "update" else None)
        points = stationarity_points(model, run.init_model, cfg.stat_at, cfg.stat_path_points)
        zero = stat_at_zero(run.target, cfg.stat_distance)
        run.stat = _StatSetup(points=points, zero=zero, divisor=zero if cfg.stat_relative else 1.0)
        self.stat_zero, self.log = zero, cfg.lambda_param == "log"
        lam0 = float(cfg.lambda_init)
        if cfg.lambda_autoscale:
            lam0 *= lambda_scale(model, x, y, run.target, at=points)
        n = run.C * run.ipc
        start = math.log(max(lam0, 1e-30)) if self.log else lam0  # log: multiplicative steps, feasible by construction
        self.param = torch.full((n,), start, device=run.device, requires_grad=True)
        self.opt = (torch.optim.Adam([self.param], lr=cfg.lr_lambda) if cfg.lambda_optimizer == "adam"
                    else torch.optim.SGD([self.param], lr=cfg.lr_lambda))

    def value(self) -> Tensor:
        """lambda itself (the optimised tensor is log lambda under lambda_param 'log')."""
        return self.param.exp() if self.log else self.param

    def step(self) -> None:
        self.opt.step()
        if not self.log:
            with torch.no_grad():
                self.param.clamp_(min=0.0)  # dual feasibility (projection)


def _image_optimizer(x: Tensor, name: str, cfg: DistillConfig) -> torch.optim.Optimizer:
    return (torch.optim.Adam([x], lr=cfg.lr_img_adam) if name == "adam"
            else torch.optim.SGD([x], lr=cfg.lr_img, momentum=cfg.momentum_img))


def _backward(total: Tensor, parts: dict[str, Tensor], x: Tensor, lam: _Multipliers | None,
              opt_img: torch.optim.Optimizer, per_part: bool) -> dict[str, float]:
    """Gradients of the loss into S (and lambda). ``per_part`` (a logged iteration): each weighted part's own
    image gradient, whose sum is the total gradient, so nothing is computed twice; lambda's comes from L_stat
    only. Returns the per-part gradient norms ({} otherwise)."""
    opt_img.zero_grad(set_to_none=True)
    if lam is not None:
        lam.opt.zero_grad(set_to_none=True)
    if not per_part:
        # Only S and lambda: without ``inputs`` autograd also builds d(total)/d(theta*)
        # for the DKKT pass's live parameter leaves (a wasted Hessian-vector product).
        total.backward(inputs=[x] if lam is None else [x, lam.param])
        return {}
    norms: dict[str, float] = {}
    keys = list(parts)
    for i, k in enumerate(keys):
        wrt = [x] if (k != "stat" or lam is None) else [x, lam.param]
        g = torch.autograd.grad(parts[k], wrt, retain_graph=i < len(keys) - 1, allow_unused=True)
        gx = g[0] if g[0] is not None else torch.zeros_like(x)
        norms[k] = float(gx.norm())
        x.grad = gx if x.grad is None else x.grad + gx
        if len(g) > 1 and g[1] is not None:
            lam.param.grad = g[1]  # type: ignore[union-attr]
    return norms


def _finite(total: Tensor, x: Tensor, lam: _Multipliers | None) -> bool:
    """One host sync per iteration: the loss and every gradient finite?"""
    ok = torch.isfinite(total) & torch.isfinite(x.grad).all()  # type: ignore[arg-type]
    if lam is not None and lam.param.grad is not None:
        ok = ok & torch.isfinite(lam.param.grad).all()
    return bool(ok)


def _history_row(it: int, t0: float, total: Tensor, terms: dict[str, Tensor], lam: _Multipliers | None,
                 grad_norms: dict[str, float]) -> dict[str, float]:
    """One loss-history entry: every term, L_stat / D(target, 0), lambda's spread, each part's gradient share."""
    row = {"iteration": it, "total": float(total.detach()), "elapsed_s": time.monotonic() - t0}
    row.update({k: float(v.detach()) for k, v in terms.items()})
    if lam is not None:
        lam_now, zero = lam.value().detach(), lam.stat_zero
        row.update(stat_zero=zero, stat_ratio=row["stat"] / zero if zero > 0 else float("nan"),
                   lambda_min=float(lam_now.min()), lambda_mean=float(lam_now.mean()),
                   lambda_max=float(lam_now.max()), lambda_zero=int((lam_now <= 0).sum()))
    norm_sum = sum(grad_norms.values())
    for k, v in grad_norms.items():
        row[f"gradnorm_{k}"] = v
        row[f"gradshare_{k}"] = v / norm_sum if norm_sum > 0 else 0.0
    return row


class _Run:
    """Shared state of one ``synthesize`` call; ``optimize`` runs one gradient method."""

    def __init__(self, *, ipc: int, num_classes: int, image_shape: tuple[int, int, int], pipc: int,
                 pool: _SafePool | None, model: nn.Module | None,
                 embed_factory: Callable[[torch.Generator], nn.Module] | None,
                 config: DistillConfig, device: torch.device, bar: Any,
                 init_model: nn.Module | None = None) -> None:
        self.ipc, self.C, self.shape, self.pipc = ipc, num_classes, image_shape, pipc
        self.pool, self.embed_factory, self.cfg, self.device, self.bar = pool, embed_factory, config, device, bar
        # None: the device's profile (packs of 256 on the CPU, one forward on a GPU); 0: one forward
        self.dm_max_batch = profile_value("distill.dm_max_batch", config.dm_max_batch, device.type) or None
        self.model = None
        self.init_model = None if init_model is None else copy.deepcopy(init_model).to(device)
        self.target: dict[str, Tensor] | None = None  # what the stationarity sum must reach
        self.stat: _StatSetup | None = None  # where and against what the stationarity sum is measured
        self.init_x: Tensor | None = None  # dm_from_dsv: start images given by the caller
        if model is not None:
            # Frozen private copy: the caller's module keeps its mode and grad flags.
            self.model = copy.deepcopy(model).to(device).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)

    # -- setup helpers ------------------------------------------------------------
    def _resolve_init(self, method: str) -> tuple[str, str]:
        cfg_init, fixed = self.cfg.init, REGISTRY[method].init
        if fixed in ("noise", "real"):  # dsv / dsv_real / dm_reference: the method name fixes the start
            if REGISTRY[method].img_optimizer is not None:  # a reference recipe keeps its own start
                return fixed, f"method {method}"
            if cfg_init not in ("auto", fixed):
                other = "dsv_real" if fixed == "noise" else "dsv"
                raise ValueError(f"method {method!r} always starts from {fixed} images; use method {other!r} "
                                 f"for {cfg_init} init")
            return fixed, f"method {method}"
        if cfg_init != "auto":
            return cfg_init, "config"
        return default_init(self.ipc), "auto (appendix A)"

    def _init_images(self, method: str, gen: torch.Generator) -> tuple[Tensor, str]:
        if self.init_x is not None:
            return self.init_x.detach().clone().to(self.device, torch.float32), "given (DSVs)"
        init, why = self._resolve_init(method)
        if init == "real":
            assert self.pool is not None
            short = self.pool.short_classes(self.ipc)
            if short:
                if why.startswith("auto"):
                    warnings.warn(_short_msg(method, self.ipc, self.pipc, self.pool, short)
                                  + "; init 'auto' falls back to noise", stacklevel=3)
                    init, why = "noise", why + ", fallback: too few safe images"
                else:
                    raise ValueError(_short_msg(method, self.ipc, self.pipc, self.pool, short))
        if init == "real":
            x = self.pool.pick(self.ipc, gen).detach().clone()  # type: ignore[union-attr]
        else:
            x = torch.randn((self.C * self.ipc, *self.shape), generator=gen)
        return x.to(self.device, torch.float32), f"{init} ({why})"

    def _check_model(self, x: Tensor) -> None:
        assert self.model is not None
        with torch.no_grad():
            out = self.model(x[:1])
        if out.dim() != 2 or out.shape[1] != self.C:
            raise ValueError(f"model outputs shape {tuple(out.shape)} for one image, expected (1, {self.C}) logits")

    # -- the loop -------------------------------------------------------------------
    def optimize(self, method: str, gen: torch.Generator, deadline: float | None,
                 ckpt: Path | None) -> SyntheticSet:
        """Minimise the method's loss over S (and lambda) for ``iterations`` steps (Eq. 5)."""
        cfg, t0 = self.cfg, time.monotonic()
        loss = _MethodLoss(self, method)
        x0, init_desc = self._init_images(method, gen)
        y = _labels(self.C, self.ipc).to(self.device)
        x_syn = x0.requires_grad_(True)
        opt_img = _image_optimizer(x_syn, loss.img_optimizer, cfg)
        lam = _Multipliers(self, x_syn.detach(), y) if loss.use_dkkt else None
        history: list[dict[str, float]] = []
        stopped, done = "completed", 0
        task = self.bar.add_task(f"{method} ipc={self.ipc}", total=cfg.iterations, status="")
        for it in range(1, cfg.iterations + 1):
            if deadline is not None and time.monotonic() >= deadline:
                stopped = "time_budget"
                break
            lam_value = None if lam is None else lam.value()
            terms, parts = loss.parts(x_syn, y, lam_value, gen)  # the method's step: its weighted terms
            total = total_loss(parts)
            log_now = it % cfg.log_every == 0 or it == cfg.iterations
            grad_norms = _backward(total, parts, x_syn, lam, opt_img, per_part=log_now and len(parts) > 1)
            if not _finite(total, x_syn, lam):
                self._fail(method, it, terms, total, x_syn, None if lam is None else lam.param, y, ckpt, history,
                           lam_value=lam_value)
            opt_img.step()
            if lam is not None:
                lam.step()
            done = it
            status = ""
            if log_now:
                history.append(_history_row(it, t0, total, terms, lam, grad_norms))
                status = " ".join(f"{k}={v:.3g}" for k, v in history[-1].items()
                                  if k in ("total", "primal", "stat_ratio", "dm", "gradshare_stat"))
            self.bar.update(task, completed=it, **({"status": status} if log_now else {}))
            if ckpt is not None and cfg.checkpoint_every and it % cfg.checkpoint_every == 0:
                self._save(ckpt, method, it, x_syn, None if lam is None else lam.value(), y, history)

        lam_value = None if lam is None else lam.value()
        if ckpt is not None and cfg.checkpoint_every and done and done % cfg.checkpoint_every:
            self._save(ckpt, method, done, x_syn, lam_value, y, history)
        info: dict[str, Any] = {
            "loss_history": history, "iterations_done": done, "iterations_requested": cfg.iterations,
            "stopped_reason": stopped, "time_budget_s": cfg.time_budget_s, "wall_s": time.monotonic() - t0,
            **loss.describe(), "init": init_desc, "img_optimizer": loss.img_optimizer, "device": str(self.device),
            "stat_zero": lam.stat_zero if lam is not None else None,
        }
        if lam_value is not None:
            info["lambda"] = lam_value.detach().cpu().tolist()
        if loss.use_dkkt and cfg.diagnose_samples > 0:  # can real data / S satisfy the condition? (traces/)
            info["stationarity"] = self._diagnose(x_syn.detach(), y, lam_value, gen)
        return SyntheticSet(x=x_syn.detach().cpu(), y=y.cpu(), method=method, ipc=self.ipc, info=info)

    def _diagnose(self, x: Tensor, y: Tensor, lam: Tensor | None, gen: torch.Generator) -> list[dict[str, Any]]:
        """common.distill.stationarity.diagnose on up to diagnose_samples safe images and on S (after the loop,
        so its draws leave the distillation's stream alone)."""
        assert self.model is not None and self.target is not None
        sets: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}
        if self.pool is not None and sum(i.numel() for i in self.pool.idx):
            index = torch.cat(self.pool.idx)
            labels = torch.cat([torch.full((i.numel(),), c, dtype=torch.int64) for c, i in enumerate(self.pool.idx)])
            pick = torch.randperm(index.numel(), generator=gen)[:self.cfg.diagnose_samples]
            sets["safe"] = (self.pool.rows(index[pick]), labels[pick].to(self.device), None)
        sets["synthetic"] = (x, y, None if lam is None else lam.detach())
        return diagnose(self.model, self.init_model, self.target, sets, points=self.cfg.diagnose_path_points,
                        nnls_samples=min(self.cfg.diagnose_samples, 100))  # NNLS: 100 per-sample gradients

    def _save(self, path: Path, method: str, it: int, x: Tensor, lam: Tensor | None, y: Tensor,
              history: list[dict[str, float]], error: str | None = None) -> None:
        payload = {"x": x.detach().cpu().clone(), "y": y.cpu(), "method": method, "ipc": self.ipc,
                   "iteration": it, "lambda": None if lam is None else lam.detach().cpu().clone(),
                   "loss_history": list(history), "error": error}
        atomic_torch_save(payload, path)

    def _fail(self, method: str, it: int, terms: dict[str, Tensor], total: Tensor, x: Tensor,
              lam: Tensor | None, y: Tensor, ckpt: Path | None, history: list[dict[str, float]],
              lam_value: Tensor | None = None) -> None:
        bad = [k for k, v in terms.items() if not bool(torch.isfinite(v.detach()))]
        if not bad and not bool(torch.isfinite(total.detach())):
            bad = ["total"]
        if x.grad is not None and not bool(torch.isfinite(x.grad).all()):
            bad.append("grad(x)")
        if lam is not None and lam.grad is not None and not bool(torch.isfinite(lam.grad).all()):
            bad.append("grad(lambda)")
        values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        msg = f"{method}: non-finite {', '.join(bad)} at iteration {it} ({values})"
        saved = None
        # S has not been stepped with the bad gradient yet; keep it if it is itself finite.
        if ckpt is not None and bool(torch.isfinite(x.detach()).all()):
            # lambda itself (lam is the optimised tensor: log lambda under lambda_param 'log')
            self._save(ckpt, method, it - 1, x, lam if lam_value is None else lam_value, y, history, error=msg)
            saved = ckpt
            msg += f"; last good state (after iteration {it - 1}) saved to {ckpt}"
        elif ckpt is not None:
            msg += f"; the images themselves are non-finite, {ckpt} keeps the last periodic checkpoint"
        raise DistillationError(msg, iteration=it, terms=bad, checkpoint=saved)
