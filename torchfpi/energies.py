r"""Energy building blocks for :class:`torchfpi.FPIGD`: ``energy(z, *inputs) -> (B,)``.

* :class:`QuadraticEnergy`: E(z, b) = 1/2 z^T A z - b^T z, minimiser A^{-1} b (closed form).
* :class:`ICNNEnergy`: an input-convex network, convex in z for every input x, plus
  (mu/2)||z||^2 so the minimiser is unique.
* :class:`MultiLabelEnergy`: the multi-label energy family (local label scores plus a learned
  label-interaction term on the relaxation y in [0, 1]^L).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class QuadraticEnergy(nn.Module):
    r"""E(z, b) = 1/2 z^T A z - b^T z with A = L L^T + eps I symmetric positive definite.

    The gradient step z - a (A z - b) contracts iff 0 < a < 2 / lambda_max(A); its fixed
    point is A^{-1} b.

    Args:
        dim: size of z.
        A: optional fixed ``(dim, dim)`` SPD matrix; otherwise A is learned (``L`` parameter).
        eps: added to the diagonal of a learned A.

    Shapes:
        z: ``(B, dim)``; b: ``(B, dim)``; output ``(B,)``.

    Example:
        >>> import torch
        >>> from torchfpi.energies import QuadraticEnergy
        >>> E = QuadraticEnergy(2, A=torch.eye(2))
        >>> E(torch.ones(3, 2), torch.zeros(3, 2))
        tensor([1., 1., 1.])
    """

    def __init__(self, dim: int, A: Optional[Tensor] = None, eps: float = 1e-3) -> None:
        super().__init__()
        if A is not None:
            if tuple(A.shape) != (dim, dim):
                raise ValueError(f"A: expected shape ({dim}, {dim}), got {tuple(A.shape)}")
            self.register_buffer("A_fixed", A)
            self.L = None
        else:
            self.A_fixed = None
            self.L = nn.Parameter(torch.eye(dim))
        self.eps = eps

    def matrix(self) -> Tensor:
        """The SPD matrix A."""
        if self.L is None:
            return self.A_fixed  # type: ignore[return-value]  # a buffer when L is None
        return self.L @ self.L.T + self.eps * torch.eye(self.L.shape[0], dtype=self.L.dtype, device=self.L.device)

    def forward(self, z: Tensor, b: Tensor) -> Tensor:
        A = self.matrix()
        return 0.5 * ((z @ A) * z).sum(1) - (b * z).sum(1)


class ICNNEnergy(nn.Module):
    r"""Partially input-convex network: convex in z for every x.

    h_1 = softplus(A_1 z + B_1 x + c_1),
    h_{k+1} = softplus(W_k h_k + A_{k+1} z + B_{k+1} x + c_{k+1}) with W_k >= 0 elementwise,
    E(z, x) = w^T h_K + (mu/2) ||z||^2 with w >= 0.

    Softplus is convex and non-decreasing and the weights on h are non-negative (kept so by
    a softplus reparametrisation), so E is convex in z, and mu-strongly convex with mu > 0.

    Args:
        z_dim: size of z; x_dim: size of x; hidden: widths of the hidden layers.
        mu: strong-convexity weight (> 0 makes the minimiser unique).

    Shapes:
        z: ``(B, z_dim)``, x: ``(B, x_dim)``, output ``(B,)``.
    """

    def __init__(self, z_dim: int, x_dim: int, hidden: Sequence[int] = (64, 64), mu: float = 1.0) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("hidden: expected at least one hidden width")
        self.A = nn.ModuleList([nn.Linear(z_dim, h, bias=False) for h in hidden])
        self.B = nn.ModuleList([nn.Linear(x_dim, h) for h in hidden])
        self.W_raw = nn.ParameterList(
            [nn.Parameter(torch.randn(hidden[k + 1], hidden[k]) * 0.1 - 2.0) for k in range(len(hidden) - 1)]
        )
        self.w_raw = nn.Parameter(torch.full((hidden[-1],), -2.0))
        self.mu = mu

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        h = F.softplus(self.A[0](z) + self.B[0](x))
        for k, W in enumerate(self.W_raw):
            h = F.softplus(h @ F.softplus(W).T + self.A[k + 1](z) + self.B[k + 1](x))
        return h @ F.softplus(self.w_raw) + 0.5 * self.mu * (z * z).sum(1)


class MultiLabelEnergy(nn.Module):
    r"""Multi-label energy on a relaxation y in [0, 1]^L of the label vector:

    E(y, s) = - <s, y> + c^T softplus(C y) + (mu/2) ||y - 1/2||^2

    where ``s`` are per-label scores computed from the input by any network (local term),
    ``c^T softplus(C y)`` with learned ``C`` (``(K, L)``) and ``c`` (``(K,)``) scores label
    configurations jointly (interaction term, as SPEN's global energy), and the small quadratic
    keeps the gradient step contractive. Use it with ``FPIGD(..., projection="box")``.

    Args:
        num_labels: L. interactions: K, the number of learned label patterns.
        mu: weight of the quadratic term (>= 0).

    Shapes:
        y: ``(B, L)``, s: ``(B, L)``, output ``(B,)``.
    """

    def __init__(self, num_labels: int, interactions: int = 16, mu: float = 1.0) -> None:
        super().__init__()
        self.C = nn.Linear(num_labels, interactions)
        nn.init.normal_(self.C.weight, std=0.01)
        self.c = nn.Parameter(torch.zeros(interactions))
        self.mu = mu

    def forward(self, y: Tensor, s: Tensor) -> Tensor:
        local = -(s * y).sum(1)
        interaction = F.softplus(self.C(y)) @ self.c
        return local + interaction + 0.5 * self.mu * ((y - 0.5) ** 2).sum(1)
