"""Limited-memory Broyden solver for ``g(z) = f(z) - z = 0``, per sample, safeguarded.

Kept in its own module (it follows the solver protocol of :mod:`torchfpi._solvers`, where it is
registered as ``solver="broyden"``); ``ImplicitAdjoint(Broyden())`` and ``backward="broyden"``
solve the adjoint fixed point with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict

import torch
from torch import Tensor

State = Dict[str, Any]


def _number(name: str, value: object, low: float, low_open: bool, high: float = math.inf) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high  # type: ignore[operator]
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if math.isfinite(high) else "")
        raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")


@dataclass(frozen=True)
class Broyden:
    """Limited-memory ("good") Broyden iteration on ``g(z) = f(z) - z``, per sample.

    It keeps a low-rank approximation of the inverse Jacobian of ``g``,
    ``H = -I + sum_i u_i v_i^T`` over at most ``m`` pairs (a ring: memory ``2 m B N`` numbers
    however many iterations run), and steps ``z <- z - H g(z)``. With no pairs yet, ``H = -I``
    and the step is plain FPI ``z <- f(z)``. Each iteration updates ``H`` with the secant pair
    ``s = z_k - z_{k-1}``, ``y = g_k - g_{k-1}`` by Sherman-Morrison.

    Safeguards, per sample: a secant update whose denominator ``s^T H y`` is tiny or not finite
    is skipped; a step longer than ``max_step`` times ``||g||`` or not finite is replaced by the
    damped FPI step ``z + damping g`` and the memory cleared; a residual above ``restart`` times
    the best one so far clears the memory (the next step is then FPI).

    When to pick it: on maps whose Jacobian has a few dominant eigenvalues near 1 (slow FPI) it
    behaves like a quasi-Newton method and often needs fewer iterations than Anderson; each
    iteration costs ``O(m N)`` per sample beyond the call of ``f`` (Anderson: ``O(m N)`` too,
    plus an ``m x m`` solve). On fast contractions (FPI in tens of iterations), plain FPI is
    cheapest per iteration and usually wins on time.

    Args:
        m: memory (number of secant pairs), at least 1.
        damping: weight in (0, 1] of the fallback FPI step.
        restart: residual growth factor (> 1) over the best residual that clears the memory.
        max_step: largest allowed ``||step|| / ||g||`` before falling back to FPI (> 1).

    Example:
        >>> import torch, torchfpi
        >>> A = 0.95 * torch.eye(4)
        >>> sol = torchfpi.fixed_point(lambda z: z @ A + 1, torch.zeros(3, 4),
        ...                            solver=torchfpi.Broyden(m=5), tol=1e-8, max_iter=50)
        >>> bool(sol.converged.all()), torch.allclose(sol.value, torch.full((3, 4), 20.0))
        (True, True)
    """

    m: int = 8
    damping: float = 1.0
    restart: float = 10.0
    max_step: float = 1e4

    uses_residual: ClassVar[bool] = True
    """The loop passes the device residual (for the restart rule)."""

    def __post_init__(self) -> None:
        if not isinstance(self.m, int) or isinstance(self.m, bool) or self.m < 1:
            raise ValueError(f"m: expected an integer >= 1, got {self.m!r}")
        _number("damping", self.damping, 0.0, True, 1.0)
        _number("restart", self.restart, 1.0, True)
        _number("max_step", self.max_step, 1.0, True)

    def init(self, z: Tensor, fz: Tensor) -> State:
        b, n = z.shape
        return {
            "U": z.new_zeros(b, self.m, n),
            "V": z.new_zeros(b, self.m, n),
            "valid": torch.zeros(b, self.m, dtype=z.dtype, device=z.device),  # 1: slot in use
            "z": None,  # previous iterate
            "g": None,  # previous g(z)
            "best": torch.full((b,), math.inf, dtype=torch.float64, device=z.device),
            "ptr": 0,
        }

    @staticmethod
    def _apply(P: Tensor, Q: Tensor, valid: Tensor, x: Tensor) -> Tensor:
        """``-x + sum_i p_i (q_i . x)`` over the valid slots: ``H x`` with ``(P, Q) = (U, V)``,
        ``H^T x`` with ``(V, U)``. Multiply-sums: on the CPU faster than bmm's mat-vec."""
        c = (Q * x.unsqueeze(1)).sum(2) * valid  # (B, m)
        return torch.baddbmm(-x.unsqueeze(1), c.unsqueeze(1), P).squeeze(1)

    def step(self, state: State, z: Tensor, fz: Tensor, residual: Any) -> Tensor:
        U: Tensor = state["U"]
        V: Tensor = state["V"]
        valid: Tensor = state["valid"]
        best: Tensor = state["best"]
        ptr: int = state["ptr"]
        g = fz - z
        if torch.is_grad_enabled():  # unrolled differentiation records this step
            U, V, valid = U.clone(), V.clone(), valid.clone()
        keep = None
        if residual is not None:
            res = torch.as_tensor(residual, device=z.device).to(torch.float64)
            keep = ~(res > self.restart * best)
            best = torch.minimum(best, torch.nan_to_num(res, nan=math.inf))
        zp, gp = state["z"], state["g"]
        if zp is not None and zp.shape == z.shape:
            s, y = z - zp, g - gp
            Hy = self._apply(U, V, valid, y)
            den = (s * Hy).sum(1)
            scale = torch.linalg.vector_norm(s, dim=1) * torch.linalg.vector_norm(Hy, dim=1)
            ok = torch.isfinite(den) & (den.abs() > 1e-10 * scale) & (scale > 0)
            safe = torch.where(ok, den, torch.ones_like(den))
            v = self._apply(V, U, valid, s)  # H^T s, before slot ptr is overwritten
            okc = ok.unsqueeze(1)
            U[:, ptr] = torch.where(okc, (s - Hy) / safe.unsqueeze(1), torch.zeros((), dtype=s.dtype, device=s.device))
            V[:, ptr] = torch.where(okc, v, torch.zeros((), dtype=s.dtype, device=s.device))
            valid[:, ptr] = ok.to(valid.dtype)  # a skipped update leaves an unused slot
            ptr = (ptr + 1) % self.m
        step = -self._apply(U, V, valid, g)
        gn = torch.linalg.vector_norm(g, dim=1)
        sn = torch.linalg.vector_norm(step, dim=1)
        bad = ~torch.isfinite(sn) | (sn > self.max_step * gn)
        if keep is not None:
            bad = bad | ~keep
        z_next = torch.where(bad.unsqueeze(1), z + self.damping * g, z + step)
        valid.masked_fill_(bad.unsqueeze(1), 0.0)  # a bad step or a restart clears the memory
        state.update(U=U, V=V, valid=valid, z=z, g=g, best=best, ptr=ptr)
        return z_next


__all__ = ["Broyden"]
