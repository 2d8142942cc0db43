"""How gradients flow through a fixed point: the adjoint strategies.

With z* = f(z*, x; theta) and an incoming gradient g = dL/dz*, the exact gradient is
dL/dtheta = (df/dtheta)^T u and dL/dx = (df/dx)^T u where u solves the adjoint fixed point

    u = g + (df/dz)^T u          (evaluated at z*).

The strategies differ only in how they obtain u; all use vector-Jacobian products of f, never
an explicit Jacobian (except the ``DenseBackward`` reference):

================  =====================================================================  =====
mode              u                                                                      exact
================  =====================================================================  =====
``"fpi"``         backward FPI: iterate u <- g + J^T u from u = g (the paper's layer)     yes
``"anderson"``    the same fixed point, Anderson-accelerated                              yes
``"neumann"``     truncated Neumann series g + J^T g + ... + (J^T)^K g (RBP, K terms)      no
``"onestep"``     u = g (Jacobian-free / "1-step" gradient, as TorchDEQ's default)         no
``"unroll"``      backpropagation through the forward iterations (reference)               approx.
``"dense"``       forms J and solves (I - J^T) u = g exactly (reference, small problems)   yes
================  =====================================================================  =====

Use ``"fpi"`` or ``"anderson"`` for training unless you know the inexact modes are good enough:
their error grows with the spectral radius of J (see :func:`torchfpi.check_gradients`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from torchfpi._solution import SolveStats, Status
from torchfpi._solvers import FPI, Anderson, _check_unit_interval

VJPFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class FPIBackward:
    """The paper's backward FPI: u <- g + J^T u (optionally damped), stopped per sample at
    ``backward_tol``. Differentiable: a second derivative solves another backward FPI.

    Args:
        damping: weight in (0, 1] of the new iterate.
    """

    damping: float = 1.0

    def __post_init__(self) -> None:
        _check_unit_interval("damping", self.damping)

    @property
    def solver(self) -> object:
        return FPI(damping=self.damping)


@dataclass(frozen=True)
class AndersonBackward:
    """The adjoint fixed point solved with Anderson acceleration (see :class:`torchfpi.Anderson`)."""

    m: int = 5
    regularization: float = 1e-8
    damping: float = 1.0

    def __post_init__(self) -> None:
        Anderson(m=self.m, regularization=self.regularization, damping=self.damping)

    @property
    def solver(self) -> object:
        return Anderson(m=self.m, regularization=self.regularization, damping=self.damping)


@dataclass(frozen=True)
class NeumannBackward:
    """Truncated Neumann series / recurrent backpropagation: u = sum_{k=0}^{K} (J^T)^k g.

    Inexact unless J^T{K+1} g is negligible; costs exactly ``terms`` VJPs. Differentiable
    (the terms are recorded when a second derivative is asked for).

    Args:
        terms: K, the number of VJPs (>= 1).
    """

    terms: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.terms, int) or isinstance(self.terms, bool) or self.terms < 1:
            raise ValueError(f"terms: expected an integer >= 1, got {self.terms!r}")

    solver = None

    def solve(self, vjp_z: VJPFn, g: Tensor) -> Tuple[Tensor, Optional[SolveStats]]:
        u = g
        for _ in range(self.terms):
            u = g + vjp_z(u)
        b = g.shape[0]
        stats = SolveStats(
            iterations=torch.full((b,), self.terms, dtype=torch.int64, device=g.device),
            residual=torch.full((b,), float("nan"), dtype=g.dtype, device=g.device),
            status=torch.full((b,), int(Status.MAX_ITER), dtype=torch.int64, device=g.device),
            trace=torch.zeros(0, b, dtype=g.dtype, device=g.device),
        )
        return u, stats


@dataclass(frozen=True)
class OneStepBackward:
    """Jacobian-free gradient: u = g, i.e. (I - J^T)^{-1} replaced by I. Cheap and inexact."""

    solver = None

    def solve(self, vjp_z: VJPFn, g: Tensor) -> Tuple[Tensor, Optional[SolveStats]]:
        return g, None


@dataclass(frozen=True)
class UnrollBackward:
    """Backpropagate through the recorded forward iterations (memory grows with iterations).

    A reference for the implicit modes; the forward loop is recorded by autograd, so every
    derivative order works as for any unrolled computation.
    """

    solver = None


@dataclass(frozen=True)
class DenseBackward:
    """Form the full Jacobian J of the flat state (B*N x B*N, by B*N VJPs) and solve
    (I - J^T) u = g with ``torch.linalg.solve``. Exact; a reference for small problems.
    """

    max_size: int = 4096

    solver = None

    def solve(self, vjp_z: VJPFn, g: Tensor) -> Tuple[Tensor, Optional[SolveStats]]:
        shape = g.shape
        n = g.numel()
        if n > self.max_size:
            raise ValueError(
                f"backward='dense': the state has {n} entries (batch x size), more than "
                f"max_size={self.max_size}; use backward='fpi' or DenseBackward(max_size=...)"
            )
        eye = torch.eye(n, dtype=g.dtype, device=g.device)
        rows = [vjp_z(eye[k].reshape(shape)).reshape(n) for k in range(n)]
        J = torch.stack(rows)  # row k = e_k^T J
        system = torch.eye(n, dtype=g.dtype, device=g.device) - J.transpose(0, 1)
        u = torch.linalg.solve(system, g.reshape(n, 1)).reshape(shape)
        return u, None


Backward = Union[FPIBackward, AndersonBackward, NeumannBackward, OneStepBackward, UnrollBackward, DenseBackward]

BACKWARD_MODES = {
    "fpi": FPIBackward,
    "anderson": AndersonBackward,
    "neumann": NeumannBackward,
    "onestep": OneStepBackward,
    "unroll": UnrollBackward,
    "dense": DenseBackward,
}


def resolve_backward(backward: object) -> Backward:
    """Turn a mode name or strategy object into a strategy object, or raise naming the choices."""
    if isinstance(backward, str):
        cls = BACKWARD_MODES.get(backward)
        if cls is None:
            raise ValueError(
                f"backward: expected one of {sorted(BACKWARD_MODES)} or a backward strategy object, "
                f"got {backward!r}"
            )
        return cls()
    if isinstance(backward, tuple(BACKWARD_MODES.values())):
        return backward  # type: ignore[return-value]
    raise ValueError(
        f"backward: expected one of {sorted(BACKWARD_MODES)} or a backward strategy object "
        f"(torchfpi.FPIBackward, ...), got {type(backward).__name__}"
    )
