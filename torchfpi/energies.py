r"""Energy building blocks for :class:`torchfpi.FPIGD`: ``energy(z, *inputs) -> (B,)``.

* :class:`QuadraticEnergy`: E(z, b) = 1/2 z^T A z - b^T z, minimiser A^{-1} b (closed form).
* :class:`ICNNEnergy`: an input-convex network, convex in z for every input x, plus
  (mu/2)||z||^2 so the minimiser is unique.
* :class:`MultiLabelEnergy`: the multi-label energy of the application (local label scores plus
  a learned label-interaction term on the relaxed labels sigmoid(z), or an input-convex one).
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
    r"""Multi-label energy on label logits z in R^L (the multi-label application's energy):

    E(z; s) = tau/2 ||z - center||^2 - <z, s> + sum_k c_k softplus(C_k . phi(z) + b_k + bias_k)

    ``s`` are per-label scores computed from the input by any network (the local term); the
    last term, with learned ``C`` (``(K, L)``, bias ``b``) and ``c`` (``(K,)``), scores label
    configurations jointly (SPEN's global label-interaction energy) on the relaxed labels
    ``phi(z) = sigmoid(z)`` (``space="prob"``) or on ``z`` itself (``space="logit"``). Without it
    the minimiser is ``center + s / tau``; the quadratic keeps the gradient step contractive.

    With ``convex_input=D`` the interaction term is instead an input-convex network of
    ``(z, x)`` (:class:`ICNNEnergy`, ``K`` hidden units, its ``mu`` = ``tau``): E is then convex in
    z for every input and ``tau``-strongly convex, so its minimiser is unique.

    Contraction of the step ``z - grad E`` (tau = 1, step 1, ``"prob"`` space, center 0): its
    Jacobian is the Hessian of the interaction term, whose norm is at most
    ``max|sigmoid''| ||c|| + ||C||^2 ||c||_inf / 64 <= 0.097 ||c|| + ||c|| / 64`` when ``||C||_2 <= 1``,
    so ``||c|| < 8.9`` makes it a contraction (the application bounds ``C`` and ``c`` so).

    Args:
        num_labels: L.
        interactions: K, the number of label-interaction units (hidden units of the ICNN).
        tau: weight of the quadratic term (> 0).
        init_scale: the initial ``c`` is ``init_scale * N(0, 1) / sqrt(K)`` (0: starts as the
            local term alone).
        space: ``"prob"`` (the interaction term acts on sigmoid(z)) or ``"logit"`` (on z).
        center: centre of the quadratic term (``0.5`` with ``space="logit"`` and
            ``FPIGD(..., projection="box")`` makes an energy on y in [0, 1]^L).
        convex_input: D, the size of the input x of an input-convex interaction term (None:
            the softplus interaction term above).

    Shapes:
        z: ``(B, L)``, s: ``(B, L)``, output ``(B,)``. ``forward(z, s, context, weight, c)``:
        ``context`` is ``(B, K)``, added to the interaction units' pre-activations (an
        input-dependent bias; optional), or with ``convex_input`` the ICNN's input ``(B, D)``
        (required); ``weight`` ``(K, L)`` and ``c`` ``(K,)`` replace ``C``'s weight and ``c`` when
        given (e.g. norm-bounded copies computed once per solve).

    Example:
        >>> import torch, torchfpi
        >>> from torchfpi.energies import MultiLabelEnergy
        >>> energy = MultiLabelEnergy(5, interactions=4, init_scale=1.0)
        >>> layer = torchfpi.FPIGD(energy, step_size=1.0, init=lambda s: s.detach().clone())
        >>> z = layer(torch.randn(3, 5))  # logits; torch.sigmoid(z) are the label probabilities
        >>> z.shape, energy(z, torch.zeros(3, 5)).shape
        (torch.Size([3, 5]), torch.Size([3]))
    """

    def __init__(
        self,
        num_labels: int,
        interactions: int = 16,
        tau: float = 1.0,
        *,
        init_scale: float = 0.0,
        space: str = "prob",
        center: float = 0.0,
        convex_input: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not tau > 0:
            raise ValueError(f"tau: expected a number > 0, got {tau!r}")
        if space not in ("prob", "logit"):
            raise ValueError(f"space: expected 'prob' or 'logit', got {space!r}")
        if convex_input is not None and (space != "prob" or center != 0.0):
            raise ValueError("convex_input: the input-convex interaction term takes the defaults space='prob' "
                             f"and center=0 (space and center do not apply to it, nor init_scale); got "
                             f"space={space!r}, center={center!r}")
        self.tau = tau
        self.space = space
        self.center = center
        self.convex = convex_input is not None
        if convex_input is not None:
            self.icnn = ICNNEnergy(num_labels, convex_input, hidden=(interactions,), mu=tau)
            return
        self.C = nn.Linear(num_labels, interactions)
        self.c = nn.Parameter(init_scale * torch.randn(interactions) / interactions**0.5)
        nn.init.normal_(self.C.weight, std=0.1)
        nn.init.zeros_(self.C.bias)

    def forward(
        self,
        z: Tensor,
        s: Tensor,
        context: Optional[Tensor] = None,
        weight: Optional[Tensor] = None,
        c: Optional[Tensor] = None,
    ) -> Tensor:
        if self.convex:
            if context is None:
                raise ValueError("context: the input-convex energy needs the input x, shape (B, convex_input)")
            return self.icnn(z, context) - (z * s).sum(1)
        y = torch.sigmoid(z) if self.space == "prob" else z
        weight = self.C.weight if weight is None else weight
        c = self.c if c is None else c
        pre = F.linear(y, weight, self.C.bias)
        if context is not None:
            pre = pre + context
        interaction = F.softplus(pre) @ c
        d = z - self.center
        quadratic = (d * d).sum(1)
        return 0.5 * self.tau * quadratic - (z * s).sum(1) + interaction
