"""Closed-form fixed-point problems used across the tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SOLVER_TOL = 1e-12
"""Forward and backward tolerance of the tight solves in float64."""
GRAD_RTOL = 1e-7
"""Tolerance for exact gradients of tight solves against closed forms (tied to SOLVER_TOL)."""


def contraction(n: int, radius: float, gen: torch.Generator, dtype=torch.float64, symmetric=False) -> Tensor:
    """A random ``(n, n)`` matrix with spectral norm ``radius`` (so spectral radius <= radius)."""
    A = torch.randn(n, n, generator=gen, dtype=dtype)
    if symmetric:
        A = A + A.T
    return radius * A / torch.linalg.matrix_norm(A, 2)


@dataclass
class Affine:
    """f(z, x) = z A^T + x U^T; z* = (I - A)^{-1} U x per sample."""

    A: Tensor
    U: Tensor

    def __call__(self, z: Tensor, x: Tensor) -> Tensor:
        return z @ self.A.T + x @ self.U.T

    def solution(self, x: Tensor) -> Tensor:
        n = self.A.shape[0]
        eye = torch.eye(n, dtype=self.A.dtype)
        return torch.linalg.solve(eye - self.A, (x @ self.U.T).T).T

    def grad_x(self, w: Tensor) -> Tensor:
        """d<w, z*>/dx."""
        n = self.A.shape[0]
        eye = torch.eye(n, dtype=self.A.dtype)
        return w @ torch.linalg.inv(eye - self.A) @ self.U


def affine(n: int, d: int, radius: float, gen: torch.Generator, dtype=torch.float64) -> Affine:
    return Affine(contraction(n, radius, gen, dtype), torch.randn(n, d, generator=gen, dtype=dtype))


def spd(n: int, gen: torch.Generator, dtype=torch.float64, cond: float = 10.0) -> Tensor:
    """A random SPD matrix with eigenvalues spread in [1, cond]."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
    eig = torch.linspace(1.0, cond, n, dtype=dtype)
    return Q @ torch.diag(eig) @ Q.T
