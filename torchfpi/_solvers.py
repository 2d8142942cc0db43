"""Forward iteration strategies behind one protocol, and the registry of their names.

The solver protocol (:class:`Solver`), on flat states ``(B, N)``:

* ``init(z, fz) -> state``: a dict whose tensors have the batch as dim 0 (Python scalars
  allowed); the loop slices every tensor of it when it drops stopped samples (``compact``);
* ``step(state, z, fz, residual) -> z_next``: the next iterate from the iterate ``z``, its image
  ``fz = f(z)`` and the ``(B,)`` float64 residual. ``step`` updates ``state`` **in place**
  (``state.update(...)``), and must not modify ``z`` or ``fz``. Under grad mode (the
  ``"unroll"`` adjoint records the loop) it clones a state tensor before writing into it, so
  that autograd keeps the history it recorded.

The loop (:func:`torchfpi._loop.iterate`) owns everything else: residuals, per-sample stopping,
divergence and NaN detection, compaction, best iterates and traces. Adding a solver: write the
dataclass here and add its name to :data:`SOLVERS` (or pass the object itself as ``solver=``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Protocol, Union, runtime_checkable

import torch
from torch import Tensor

State = Dict[str, Any]


@runtime_checkable
class Solver(Protocol):
    """What ``fixed_point(..., solver=...)`` accepts besides a name (see the module docstring)."""

    def init(self, z: Tensor, fz: Tensor) -> State: ...

    def step(self, state: State, z: Tensor, fz: Tensor, residual: Tensor) -> Tensor: ...


def _check_unit_interval(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 < value <= 1.0):
        raise ValueError(f"{name}: expected a number in (0, 1], got {value!r}")


@dataclass(frozen=True)
class FPI:
    """Plain or damped fixed-point iteration: ``z <- (1 - damping) z + damping f(z)``.

    Args:
        damping: step weight in (0, 1]; ``1`` is the plain iteration z <- f(z). Damping makes a
            map whose Jacobian has eigenvalues with real part < 1 but modulus >= 1 contractive.

    Example:
        >>> import torch, torchfpi
        >>> sol = torchfpi.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 3),
        ...                            solver=torchfpi.FPI(damping=0.8))
        >>> torch.allclose(sol.value, torch.full((2, 3), 2.0))
        True
    """

    damping: float = 1.0

    def __post_init__(self) -> None:
        _check_unit_interval("damping", self.damping)

    def init(self, z: Tensor, fz: Tensor) -> State:
        return {}

    def step(self, state: State, z: Tensor, fz: Tensor, residual: Tensor) -> Tensor:
        if self.damping == 1.0:
            return fz
        return torch.lerp(z, fz, self.damping)


@dataclass(frozen=True)
class Anderson:
    """Anderson acceleration (type II) with a window, regularisation and a safeguard.

    Each step combines the last ``m`` iterates: it finds weights ``alpha`` (summing to one) that
    minimise ``||sum_i alpha_i (f(z_i) - z_i)||^2 + regularization * scale * ||alpha||^2`` (a
    ridge-regularised least squares solved per sample in float64 with ``torch.linalg``) and
    moves to ``sum_i alpha_i [(1 - damping) z_i + damping f(z_i)]``.

    When it helps: like any Krylov-type acceleration, when the Jacobian's spectrum is clustered
    (e.g. real in [0, rho] for gradient-descent maps of ill-conditioned energies, where it cuts
    the iterations several-fold). When the spectrum fills a disc around 0 of radius rho (random
    convolutional DEQ maps), no polynomial acceleration beats z <- f(z) by much: expect ~0.5-0.8
    of FPI's iterations there.

    Safeguards, per sample: if the small system is ill-conditioned (non-finite weights or
    ``sum |alpha| > max_coefficient``) the step falls back to damped FPI; if the residual grows
    above ``restart`` times the best residual so far, the history is cleared (restart), which
    makes the next step a damped FPI step too.

    Args:
        m: window size (number of past iterates), at least 1 (``m=1`` is damped FPI).
        regularization: ridge weight relative to the mean diagonal of the Gram matrix, >= 0.
        damping: mixing weight in (0, 1].
        restart: residual growth factor (> 1) that triggers a restart.
        max_coefficient: largest allowed ``sum |alpha|`` before falling back to FPI.

    Example:
        >>> import torch, torchfpi
        >>> A = 0.95 * torch.eye(4)
        >>> sol = torchfpi.fixed_point(lambda z: z @ A + 1, torch.zeros(3, 4),
        ...                            solver=torchfpi.Anderson(m=5), tol=1e-8, max_iter=50)
        >>> bool(sol.converged.all()), torch.allclose(sol.value, torch.full((3, 4), 20.0))
        (True, True)
    """

    m: int = 5
    regularization: float = 1e-8
    damping: float = 1.0
    restart: float = 10.0
    max_coefficient: float = 1e4

    def __post_init__(self) -> None:
        if not isinstance(self.m, int) or isinstance(self.m, bool) or self.m < 1:
            raise ValueError(f"m: expected an integer >= 1, got {self.m!r}")
        if not (isinstance(self.regularization, (int, float)) and self.regularization >= 0):
            raise ValueError(f"regularization: expected a number >= 0, got {self.regularization!r}")
        _check_unit_interval("damping", self.damping)
        if not (isinstance(self.restart, (int, float)) and self.restart > 1):
            raise ValueError(f"restart: expected a number > 1, got {self.restart!r}")
        if not (isinstance(self.max_coefficient, (int, float)) and self.max_coefficient > 1):
            raise ValueError(f"max_coefficient: expected a number > 1, got {self.max_coefficient!r}")

    def init(self, z: Tensor, fz: Tensor) -> State:
        b, n = z.shape
        m = self.m
        return {
            "F": z.new_zeros(b, m, n),  # past images f(z_i)
            "G": z.new_zeros(b, m, n),  # past residuals f(z_i) - z_i
            "H": torch.zeros(b, m, m, dtype=torch.float64, device=z.device),  # Gram of G
            "valid": torch.zeros(b, m, dtype=torch.bool, device=z.device),
            "best": torch.full((b,), math.inf, dtype=torch.float64, device=z.device),
            "ptr": 0,
        }

    def step(self, state: State, z: Tensor, fz: Tensor, residual: Tensor) -> Tensor:
        F: Tensor = state["F"]
        G: Tensor = state["G"]
        H: Tensor = state["H"]
        valid: Tensor = state["valid"]
        best: Tensor = state["best"]
        ptr: int = state["ptr"]
        m = self.m
        g = fz - z
        res64 = torch.as_tensor(residual, dtype=torch.float64).to(z.device)
        # Restart where the residual blew up relative to the best one seen.
        restart = res64 > self.restart * best
        best = torch.minimum(best, torch.nan_to_num(res64, nan=math.inf))
        if torch.is_grad_enabled():
            # Unrolled differentiation records this step: keep the history functional.
            F, G, H, valid = F.clone(), G.clone(), H.clone(), valid.clone()
        valid.masked_fill_(restart.unsqueeze(1), False)
        F[:, ptr] = fz
        G[:, ptr] = g
        valid[:, ptr] = True
        # (B, m): <G_i, g>. A broadcast multiply-sum beats bmm's batched mat-vec on CPU.
        row = (G * g.unsqueeze(1)).sum(2).to(torch.float64)
        H[:, ptr, :] = row
        H[:, :, ptr] = row
        both = valid.unsqueeze(2) & valid.unsqueeze(1)
        Hm = torch.where(both, H, torch.zeros((), dtype=H.dtype, device=H.device))
        diag = torch.diagonal(Hm, dim1=1, dim2=2)
        n_valid = valid.sum(1).clamp_min(1)
        scale = diag.sum(1) / n_valid
        ridge = self.regularization * scale + torch.finfo(torch.float64).tiny
        eye = torch.eye(m, dtype=H.dtype, device=H.device)
        # Invalid slots get an identity row so the system stays regular; their weight is zeroed.
        pad = torch.where(valid, ridge.unsqueeze(1), torch.ones((), dtype=H.dtype, device=H.device))
        system = Hm + eye * pad.unsqueeze(2)
        rhs = valid.to(H.dtype).unsqueeze(2)
        sol, _ = torch.linalg.solve_ex(system, rhs)
        a = sol.squeeze(2) * valid
        total = a.sum(1, keepdim=True)
        alpha = a / total
        bad = ~torch.isfinite(alpha).all(1) | (alpha.abs().sum(1) > self.max_coefficient)
        alpha = torch.where(bad.unsqueeze(1), torch.zeros((), dtype=alpha.dtype, device=alpha.device), alpha)
        alpha = alpha.to(z.dtype).unsqueeze(1)  # (B, 1, m)
        mix_f = torch.bmm(alpha, F).squeeze(1)
        if self.damping == 1.0:
            z_next = mix_f
        else:
            mix_g = torch.bmm(alpha, G).squeeze(1)
            z_next = mix_f - (1.0 - self.damping) * mix_g
        fallback = z + self.damping * g
        z_next = torch.where(bad.unsqueeze(1), fallback, z_next)
        state.update(F=F, G=G, H=H, valid=valid, best=best, ptr=(ptr + 1) % m)
        return z_next


SOLVERS: Dict[str, type] = {"fpi": FPI, "anderson": Anderson}
"""The solver names ``fixed_point(..., solver=...)`` accepts; each maps to a class built with no arguments."""


def resolve_solver(solver: Union[str, Solver]) -> Solver:
    """A solver name or object -> a solver object, or a ``ValueError`` naming the choices."""
    if isinstance(solver, str):
        cls = SOLVERS.get(solver)
        if cls is None:
            raise ValueError(f"solver: expected one of {sorted(SOLVERS)} or a solver object, got {solver!r}")
        return cls()
    if callable(getattr(solver, "init", None)) and callable(getattr(solver, "step", None)):
        return solver
    raise ValueError(
        f"solver: expected one of {sorted(SOLVERS)} or a solver object with init() and step() "
        f"(torchfpi.FPI, torchfpi.Anderson), got {type(solver).__name__}"
    )
