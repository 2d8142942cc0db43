"""Forward iteration strategies behind one protocol, and the registry of their names.

The solver protocol (:class:`Solver`), on flat states ``(B, N)``:

* ``init(z, fz) -> state``: a dict whose tensors have the batch as dim 0 (Python scalars
  allowed); the loop slices every tensor of it when it drops stopped samples (``compact``);
* ``step(state, z, fz, residual) -> z_next``: the next iterate from the iterate ``z``, its image
  ``fz = f(z)`` and the ``(B,)`` residual as a tensor on ``z``'s device (no host copy), or
  ``None`` for :class:`FPI` and for a solver whose class sets ``uses_residual = False`` (it is
  not computed then). ``step`` updates ``state`` **in place**
  (``state.update(...)``), and must not modify ``z`` or ``fz``. Under grad mode (the
  ``"unroll"`` adjoint records the loop) it clones a state tensor before writing into it, so
  that autograd keeps the history it recorded.

The loop (:func:`torchfpi._loop.iterate`) owns everything else: residuals, per-sample stopping,
divergence and NaN detection, compaction, best iterates and traces. Adding a solver: write the
dataclass here and add its name to :data:`SOLVERS` (or pass the object itself as ``solver=``).
"""

from __future__ import annotations

import math
import numbers
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
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not (0.0 < value <= 1.0):
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
    ``sum |alpha| > max_coefficient``) the step falls back to damped FPI; if the absolute
    residual ``||f(z) - z||`` grows above ``restart`` times the smallest one so far (a measure
    that keeps growing in a blow-up, unlike the relative residual, which levels off near 1), the
    history is cleared (restart), which makes the next step a damped FPI step too.

    Repelling fixed points (``safeguard=True``, the default): Anderson solves ``f(z) - z = 0``
    and, unlike the plain iteration, can converge to a fixed point that ``z <- f(z)`` repels,
    such as the local maximum of an energy under a gradient step ``z - eta * grad E(z)``, or
    the fixed point 0 of the logistic map ``r z (1 - z)`` for ``1 < r < 3``. After each step,
    the secant slope of the residual along the last move, ``s = <g_k - g_{k-1}, z_k - z_{k-1}>
    / ||z_k - z_{k-1}||^2`` with ``g = f(z) - z`` (a Rayleigh quotient of ``df/dz - I``), is
    measured per sample. Near a fixed point that damped FPI attracts along that direction it
    is negative; ``s > 0`` means the map pushes away along it (for a gradient step, the energy
    curves down along the move: ``<grad E_k - grad E_{k-1}, z_k - z_{k-1}> < 0``). After
    ``patience`` consecutive steps with ``s > 0`` the sample switches to damped FPI from its
    current iterate for the rest of the solve (history cleared). The first move is a damped
    FPI step, so with the default ``patience=1`` a sample that starts where the map repels
    never takes an Anderson step: it follows the damped iteration exactly and lands where that
    lands (going back to Anderson later was tried and can jump to another basin or back to
    the repelling point); such samples run at FPI's speed. Where the map attracts, ``s < 0``
    and the safeguard does not act: on the benchmark problems and the contractions of the
    test suite it changes no iterate (a strongly non-normal contraction could show ``s > 0``
    along some move; the cost is then FPI's speed for that sample, not another answer). What
    it cannot see: a repelling direction the iterates never move along. And when ``s > 0``
    shows only after Anderson has come very close to a repelling point, the sample switches
    from there, and leaving it can grow the residual enough for the loop to report DIVERGED.
    Pass ``safeguard=False`` for the bare method (e.g. to find an unstable fixed point on
    purpose).

    Args:
        m: window size (number of past iterates), at least 1 (``m=1`` is damped FPI).
        regularization: ridge weight relative to the mean diagonal of the Gram matrix, >= 0.
        damping: mixing weight in (0, 1].
        restart: growth factor (> 1) of the absolute residual that triggers a restart.
        max_coefficient: largest allowed ``sum |alpha|`` before falling back to FPI.
        safeguard: fall back to damped FPI near fixed points the map repels (see above).
        patience: consecutive steps (>= 1) with a positive secant slope before switching.

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
    safeguard: bool = True
    patience: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.m, numbers.Integral) or isinstance(self.m, bool) or self.m < 1:
            raise ValueError(f"m: expected an integer >= 1, got {self.m!r}")
        object.__setattr__(self, "m", int(self.m))  # numpy integers too
        if not (isinstance(self.regularization, numbers.Real) and 0 <= self.regularization < math.inf):
            raise ValueError(f"regularization: expected a number >= 0, got {self.regularization!r}")
        _check_unit_interval("damping", self.damping)
        if not (isinstance(self.restart, numbers.Real) and self.restart > 1):
            raise ValueError(f"restart: expected a number > 1, got {self.restart!r}")
        if not (isinstance(self.max_coefficient, numbers.Real) and self.max_coefficient > 1):
            raise ValueError(f"max_coefficient: expected a number > 1, got {self.max_coefficient!r}")
        if not isinstance(self.safeguard, bool):
            raise TypeError(f"safeguard: expected a bool, got {type(self.safeguard).__name__}")
        if not isinstance(self.patience, int) or isinstance(self.patience, bool) or self.patience < 1:
            raise ValueError(f"patience: expected an integer >= 1, got {self.patience!r}")

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
            # The repelling-point safeguard: the previous iterate and residual, the count of
            # consecutive positive secant slopes, and which samples run damped FPI.
            "z_prev": z.new_zeros(b, n),
            "g_prev": z.new_zeros(b, n),
            "up": torch.zeros(b, dtype=torch.int64, device=z.device),
            "plain": torch.zeros(b, dtype=torch.bool, device=z.device),
            "count": 0,
        }

    def _repelled(self, state: State, z: Tensor, g: Tensor) -> Tensor:
        """``(B,)`` bool: the samples that take a damped-FPI step now (the secant-slope test).

        Updates ``up``, ``plain`` and the previous point of ``state`` (functionally).
        """
        if state["count"] == 0:
            plain: Tensor = state["plain"]
        else:
            dz = z - state["z_prev"]
            dg = g - state["g_prev"]
            tiny = torch.finfo(torch.float64).tiny
            slope = (dz * dg).sum(1, dtype=torch.float64) / ((dz * dz).sum(1, dtype=torch.float64) + tiny)
            up = torch.where(slope > 0, state["up"] + 1, torch.zeros_like(state["up"]))
            plain = state["plain"] | (up >= self.patience)
            state.update(up=up, plain=plain)
        state.update(z_prev=z, g_prev=g, count=state["count"] + 1)
        return plain

    def step(self, state: State, z: Tensor, fz: Tensor, residual: Tensor) -> Tensor:
        F: Tensor = state["F"]
        G: Tensor = state["G"]
        H: Tensor = state["H"]
        valid: Tensor = state["valid"]
        best: Tensor = state["best"]
        ptr: int = state["ptr"]
        m = self.m
        g = fz - z
        # Restart where the absolute residual blew up relative to the best one seen.
        res64 = torch.linalg.vector_norm(g.detach(), dim=1).to(torch.float64)
        restart = res64 > self.restart * best
        best = torch.minimum(best, torch.nan_to_num(res64, nan=math.inf))
        if self.safeguard:
            plain = self._repelled(state, z.detach(), g.detach())
            restart = restart | plain
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
        if self.safeguard:
            bad = bad | plain
        fallback = z + self.damping * g
        z_next = torch.where(bad.unsqueeze(1), fallback, z_next)
        state.update(F=F, G=G, H=H, valid=valid, best=best, ptr=(ptr + 1) % m)
        return z_next


from torchfpi._broyden import Broyden  # noqa: E402 - its own module, registered here

SOLVERS: Dict[str, type] = {"fpi": FPI, "anderson": Anderson, "broyden": Broyden}
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
