"""The fixed-point solve used by the flow models: ``torchfpi.fixed_point`` when the core provides it.

Until the core lands (or when it is absent) a minimal stand-in with the same contract is used:
forward iteration without a graph, then one tracked call of ``f`` at ``z*`` whose gradient is
replaced by the adjoint fixed point ``w = g + (df/dz)^T w`` solved by FPI with vector-Jacobian
products (the paper's backward FPI). Only the first derivative is supported by the stand-in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class FlowSolution:
    """What the flow models need of a fixed-point solve."""

    value: torch.Tensor
    iterations: torch.Tensor  # (B,) int64
    residual: torch.Tensor  # (B,)


def _residual(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    b = new.shape[0]
    diff = (new - old).reshape(b, -1).norm(dim=1)
    return diff / (new.reshape(b, -1).norm(dim=1) + 1e-8)


def _fallback(f: Callable[..., torch.Tensor], z0: torch.Tensor, *inputs: Any, tol: float, max_iter: int,
              backward_tol: float, backward_max_iter: int) -> FlowSolution:
    b = z0.shape[0]
    iters = torch.zeros(b, dtype=torch.int64)
    res = torch.full((b,), float("inf"))
    with torch.no_grad():
        z = z0.detach()
        for _ in range(max_iter):
            z_new = f(z, *inputs)
            active = res >= tol
            res = torch.where(active, _residual(z_new, z).cpu(), res)
            iters += active.long()
            z = z_new
            if bool((res < tol).all()):
                break
    if not torch.is_grad_enabled():
        return FlowSolution(z, iters, res)
    z_star = z.detach().requires_grad_()
    fz = f(z_star, *inputs)
    if not fz.requires_grad:
        return FlowSolution(fz.detach(), iters, res)

    def adjoint(grad: torch.Tensor) -> torch.Tensor:
        w = grad
        for _ in range(backward_max_iter):
            (vjp,) = torch.autograd.grad(fz, z_star, w, retain_graph=True)
            w_new = grad + vjp
            done = bool((_residual(w_new, w) < backward_tol).all())
            w = w_new
            if done:
                break
        return w

    fz.register_hook(adjoint)
    return FlowSolution(fz, iters, res)


def solve(f: Callable[..., torch.Tensor], z0: torch.Tensor, *inputs: Any, tol: float = 1e-3,
          max_iter: int = 50, backward_tol: float = 1e-3, backward_max_iter: int = 50) -> FlowSolution:
    """Fixed point ``z* = f(z*, *inputs)``, differentiable by the implicit (backward FPI) gradient.

    Uses ``torchfpi.fixed_point`` (solver ``"fpi"``, backward ``"fpi"``, no warnings: the flow
    models cap the iterations on purpose) when the core library provides it.
    """
    import torchfpi

    core = getattr(torchfpi, "fixed_point", None)
    if core is not None:
        sol = core(f, z0, *inputs, solver="fpi", backward="fpi", tol=tol, max_iter=max_iter,
                   backward_tol=backward_tol, backward_max_iter=backward_max_iter, on_failure="ignore")
        return FlowSolution(sol.value, sol.iterations.cpu(), sol.residual.detach().cpu())
    return _fallback(f, z0, *inputs, tol=tol, max_iter=max_iter, backward_tol=backward_tol,
                     backward_max_iter=backward_max_iter)
