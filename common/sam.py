"""Sharpness-Aware Minimization (Foret, Kleiner, Mobahi & Neyshabur, ICLR 2021).

Two-step update for a batch loss f:
  1. ``first_step``:  e(w) = rho * g / ||g||_2   (g = grad f(w), norm over ALL parameters),
                      w <- w + e(w)              (climb to the worst point in the rho-ball)
  2. recompute the gradient at w + e(w), then ``second_step``:
                      w <- w_old, then one step of the base optimizer with that gradient.

The base optimizer (SGD with momentum / weight decay by default) shares the param groups,
so learning-rate changes on ``sam.param_groups`` reach it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

__all__ = ["SAM"]


class SAM(torch.optim.Optimizer):
    """SAM wrapper around ``base_optimizer`` (a class, e.g. ``torch.optim.SGD``).

    ``rho`` is the neighbourhood radius; ``**base_kwargs`` (lr, momentum, weight_decay,
    ...) go to the base optimizer. Use ``first_step`` / ``second_step`` explicitly, or
    ``step(closure)`` where the closure recomputes the loss and calls ``backward``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        **base_kwargs: Any,
    ) -> None:
        if not rho >= 0:
            raise ValueError(f"SAM rho must be >= 0, got {rho!r}")
        super().__init__(params, dict(rho=rho, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups  # one source of truth for lr
        self.defaults.update(self.base_optimizer.defaults)

    def _grad_norm(self) -> Tensor:
        norms = [p.grad.norm(p=2) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not norms:
            raise RuntimeError("SAM.first_step: no parameter has a gradient; call backward() first")
        return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """w <- w + rho * g / ||g|| (the old weights are kept for ``second_step``)."""
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.detach().clone()
                p.add_(p.grad * scale.to(p.device, p.dtype))
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True) -> None:
        """Restore w, then step the base optimizer with the gradient taken at w + e(w)."""
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state[p].pop("old_p", None)
                if old is not None:
                    p.copy_(old)
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Full SAM step; ``closure`` must recompute the loss and call ``backward``.

        The gradient at the current weights must already be there (first backward done).
        """
        if closure is None:
            raise RuntimeError("SAM.step needs a closure (or call first_step / second_step)")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step(zero_grad=False)
        return loss
