"""The fixed-point solve used by the denoisers: ``torchfpi.fixed_point`` when the core provides it.

Until the core solver landed, a minimal local implicit layer (Anderson forward without a graph,
backward fixed-point iteration on vector-Jacobian products through one tracked call of ``f``)
stood in for it; it is kept as a fallback so that this application never depends on the core's
optional features, and a test checks that both give the same values and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor


@dataclass
class SolveInfo:
    """Per-call statistics: mean forward iterations and final relative residual (batch means).

    ``solution`` is the core :class:`torchfpi.Solution` when the core solved it: after a
    backward pass, ``solution.backward`` holds the backward solve's statistics.
    """

    iterations: float
    residual: float
    solution: Optional[Any] = None

    def backward_iterations(self) -> float:
        """Mean iterations of the latest backward solve (NaN if none ran or unknown)."""
        sol = self.solution
        if sol is None or sol.backward is None:
            return float("nan")
        return float(sol.backward.iterations.float().mean())


def _rel_res(fz: Tensor, z: Tensor) -> Tensor:
    b = z.shape[0]
    return (fz - z).reshape(b, -1).norm(dim=1) / (fz.reshape(b, -1).norm(dim=1) + 1e-9)


@torch.no_grad()
def anderson_forward(
    g: Callable[[Tensor], Tensor], z0: Tensor, tol: float, max_iter: int, m: int = 5, beta: float = 1.0
) -> tuple[Tensor, int, Tensor]:
    """Anderson acceleration of ``z = g(z)`` (batched, per-sample least squares, whole-batch stop)."""
    b = z0.shape[0]
    shape = z0.shape
    xs, fs = [], []
    z = z0
    res = torch.full((b,), float("inf"))
    k = 0
    for k in range(1, max_iter + 1):
        fz = g(z)
        res = _rel_res(fz, z)
        if bool((res < tol).all()):
            return fz, k, res
        xs.append(z.reshape(b, -1))
        fs.append(fz.reshape(b, -1))
        if len(xs) > m:
            xs.pop(0)
            fs.pop(0)
        n = len(xs)
        if n == 1:
            z = fz
            continue
        X = torch.stack(xs, 1)  # (B, n, D)
        Fm = torch.stack(fs, 1)
        G = Fm - X
        H = torch.bmm(G, G.transpose(1, 2))
        H = H + 1e-6 * H.diagonal(dim1=1, dim2=2).mean(-1).view(b, 1, 1) * torch.eye(n, dtype=z.dtype)
        ones = torch.ones(b, n, 1, dtype=z.dtype)
        try:
            w = torch.linalg.solve(H, ones)
        except RuntimeError:  # singular: fall back to a plain step
            z = fz
            xs, fs = [], []
            continue
        w = w / w.sum(dim=1, keepdim=True)
        z = (beta * torch.bmm(w.transpose(1, 2), Fm) + (1 - beta) * torch.bmm(w.transpose(1, 2), X))
        z = z.reshape(shape)
    return g(z), k, res


def local_fixed_point(
    f: Callable[..., Tensor],
    z0: Tensor,
    y: Tensor,
    tol: float = 1e-4,
    max_iter: int = 100,
    backward_tol: float = 1e-4,
    backward_max_iter: int = 100,
) -> tuple[Tensor, SolveInfo]:
    """Implicit layer ``z* = f(z*, y)``: Anderson forward, backward FPI ``u = g + J_f^T u``."""
    z, k, res = anderson_forward(lambda z: f(z, y), z0, tol, max_iter)
    info = SolveInfo(float(k), float(res.mean()))
    if not torch.is_grad_enabled():
        return z, info
    z = z.detach().requires_grad_()
    fz = f(z, y)

    def hook(grad: Tensor) -> Tensor:
        u = grad
        for _ in range(backward_max_iter):
            (ju,) = torch.autograd.grad(fz, z, u, retain_graph=True)
            new = grad + ju
            done = float((new - u).norm() / (new.norm() + 1e-12)) < backward_tol
            u = new
            if done:
                break
        return u

    if fz.requires_grad:
        fz.register_hook(hook)
    return fz, info


def solve(
    f: Callable[..., Tensor],
    z0: Tensor,
    y: Tensor,
    tol: float = 1e-4,
    max_iter: int = 100,
    use_core: bool = True,
) -> tuple[Tensor, SolveInfo]:
    """Solve ``z = f(z, y)`` with the implicit gradient; see the module docstring.

    Forward and backward are both Anderson-accelerated: the backward fixed point
    ``u = g + (I - a H)^T u`` of a gradient step contracts only as fast as plain gradient descent
    (``1 - a mu``), which for a sharp learned energy needs hundreds of plain iterations; with
    plain backward FPI and 60 iterations the gradient is a truncated Neumann series.
    """
    import torchfpi

    if use_core and hasattr(torchfpi, "fixed_point"):
        sol = torchfpi.fixed_point(
            f, z0, y, solver="anderson", backward="anderson", tol=tol, max_iter=max_iter,
            backward_tol=tol, backward_max_iter=2 * max_iter, on_failure="ignore",
        )
        value = sol.value
        if not isinstance(value, torch.Tensor):  # pragma: no cover - a tensor z0 gives a tensor value
            raise TypeError("expected a tensor fixed point")
        return value, SolveInfo(float(sol.iterations.float().mean()), float(sol.residual.mean()), sol)
    return local_fixed_point(f, z0, y, tol, max_iter, backward_tol=tol, backward_max_iter=max_iter)
