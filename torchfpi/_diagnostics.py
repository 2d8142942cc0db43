"""Diagnostics: contraction estimates, Jacobian regularisation and gradient checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

from torchfpi._adjoints import ADJOINTS, exact_modes
from torchfpi._autograd import _grad


def _flat_norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


def spectral_radius(
    f: Callable[..., Tensor], z: Tensor, *inputs: Any, iters: int = 30, seed: int = 0
) -> Tensor:
    r"""Power-iteration estimate of the spectral radius of df/dz at ``z``, per sample.

    Iterates v <- J^T v / ||v|| with vector-Jacobian products (J^T has J's spectrum) and
    returns ||J^T v|| / ||v|| at the end. A fixed-point iteration contracts near z* when this
    is below 1. Assumes ``f`` treats samples independently.

    Args:
        f: the map ``f(z, *inputs)``.
        z: ``(B, *S)`` point, typically ``sol.value``.
        iters: power iterations (VJPs).
        seed: seed of the random start vector.

    Returns:
        ``(B,)`` estimates (detached).

    Example:
        >>> import torch, torchfpi
        >>> r = torchfpi.spectral_radius(lambda z: 0.5 * z, torch.ones(2, 3))
        >>> torch.allclose(r, torch.full((2,), 0.5))
        True
    """
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters: expected an integer >= 1, got {iters!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.enable_grad():
        zd = z.detach().requires_grad_(True)
        y = f(zd, *inputs)
    v = torch.randn(z.shape, generator=gen, dtype=z.dtype).to(z.device)
    v = v / _flat_norm(v).clamp_min(1e-30).view(-1, *([1] * (z.dim() - 1)))
    ratio = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for _ in range(iters):
        w = _grad([y], [zd], [v], create_graph=False)[0]
        if w is None:
            return torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        nw = _flat_norm(w)
        ratio = nw  # v has unit norm per sample
        v = w / nw.clamp_min(1e-30).view(-1, *([1] * (z.dim() - 1)))
    return ratio.detach()


def jacobian_penalty(
    f: Callable[..., Tensor],
    z: Tensor,
    *inputs: Any,
    samples: int = 1,
    generator: Optional[torch.Generator] = None,
    probes: Optional[Tensor] = None,
) -> Tensor:
    r"""Hutchinson estimate of ||df/dz||_F^2 / dim(z), per sample, differentiable.

    E_eps ||J^T eps||^2 = ||J||_F^2 for eps ~ N(0, I). Adding ``weight * penalty.mean()`` to the
    training loss keeps a learned map contractive (as in Jacobian-regularised DEQs).

    Args:
        f: the map ``f(z, *inputs)`` (its parameters receive gradients of the penalty).
        z: ``(B, *S)`` point, usually the (detached) fixed point.
        samples: number of random probes.
        generator: random generator for the probes (reproducible penalties, e.g. one shared
            generator on every process of a data-parallel run).
        probes: ``(samples, B, *S)`` explicit probe vectors instead of random ones (e.g. the
            rows of a global batch's probes that belong to this process); overrides
            ``samples`` and ``generator``.

    Returns:
        ``(B,)`` penalty, differentiable w.r.t. the parameters of ``f`` and the inputs.

    Example:
        >>> f = lambda z, x: 0.5 * z + x
        >>> p = jacobian_penalty(f, torch.zeros(2, 3), torch.ones(2, 3), samples=4)
        >>> p.shape
        torch.Size([2])
    """
    if probes is None and (not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples: expected an integer >= 1, got {samples!r}")
    zd = z.detach().requires_grad_(True)
    y = f(zd, *inputs)
    if probes is not None:
        if not isinstance(probes, torch.Tensor) or probes.dim() < 1 or probes.shape[1:] != y.shape:
            got = tuple(probes.shape) if isinstance(probes, torch.Tensor) else type(probes).__name__
            raise ValueError(
                f"probes: expected a tensor of shape (samples, {', '.join(map(str, y.shape))}), "
                f"got {got}"
            )
        eps_list = [p.to(dtype=y.dtype, device=y.device) for p in probes]
    else:
        eps_list = [
            torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
            for _ in range(samples)
        ]
    total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    n = zd[0].numel()
    for eps in eps_list:
        (jt,) = torch.autograd.grad(y, zd, eps, create_graph=True, retain_graph=True)
        total = total + jt.reshape(jt.shape[0], -1).pow(2).sum(1)
    return total / (len(eps_list) * n)


@dataclass
class GradientCheck:
    """Result of :func:`check_gradients`.

    Attributes:
        errors: relative error of each mode's gradient against the reference (max over inputs).
        finite_difference_error: relative error of the reference directional derivative
            against central finite differences.
        reference: the mode used as reference.
        tolerance: the threshold for exact modes.
        exact_modes: modes expected to match the reference within ``tolerance``.
    """

    errors: Dict[str, float]
    finite_difference_error: float
    reference: str
    tolerance: float
    exact_modes: Sequence[str] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True if every exact mode and the finite differences agree within ``tolerance``."""
        return self.finite_difference_error <= self.tolerance and all(
            self.errors[m] <= self.tolerance for m in self.exact_modes if m in self.errors
        )

    def table(self) -> str:
        """A plain-text table of the errors."""
        lines = [f"{'mode':<10} {'rel. error':>12}  expected"]
        for m, e in self.errors.items():
            kind = "exact" if m in self.exact_modes else "inexact"
            lines.append(f"{m:<10} {e:12.3e}  {kind}")
        lines.append(f"{'fin.diff':<10} {self.finite_difference_error:12.3e}  exact")
        return "\n".join(lines)


EXACT_MODES = exact_modes()
"""The built-in exact modes (registered adjoints are looked up when ``check_gradients`` runs)."""


def check_gradients(
    f: Callable[..., Tensor],
    z0: Tensor,
    *inputs: Tensor,
    modes: Sequence[str] = tuple(ADJOINTS),
    reference: Optional[str] = None,
    tol: float = 1e-10,
    max_iter: int = 1000,
    tolerance: float = 1e-5,
    fd_eps: float = 1e-6,
    seed: int = 0,
) -> GradientCheck:
    r"""Compare the gradients of every backward mode with each other and finite differences.

    Uses the loss L = <w, z*> with a random ``w``, and reports for each mode the relative error
    ``max |g - g_ref| / max |g_ref|`` over the floating inputs that require grad (and the
    parameters of ``f`` if it is an ``nn.Module``). The reference (``"dense"`` when the state
    is small, else ``"fpi"``) is checked against a central finite difference of L along a
    random direction. Use float64 for meaningful numbers.

    Returns:
        A :class:`GradientCheck`; ``.ok`` says whether the exact modes agree.

    Example:
        >>> import torch, torchfpi
        >>> x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
        >>> rep = torchfpi.check_gradients(lambda z, x: 0.5 * torch.tanh(z) + x,
        ...                                torch.zeros(2, 3, dtype=torch.float64), x)
        >>> rep.ok
        True
    """
    from torchfpi._solve import fixed_point

    params = list(f.parameters()) if isinstance(f, torch.nn.Module) else []
    targets = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad] + [
        p for p in params if p.requires_grad
    ]
    if not targets:
        raise ValueError("inputs: check_gradients needs at least one input (or parameter) requiring grad")
    if reference is None:
        reference = "dense" if z0.numel() <= 512 else "fpi"
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(z0.shape, generator=gen, dtype=z0.dtype).to(z0.device)

    def loss(mode: str) -> Tensor:
        sol = fixed_point(f, z0, *inputs, backward=mode, tol=tol, max_iter=max_iter, on_failure="ignore")
        return (sol.value * w).sum()

    def grads(mode: str) -> Sequence[Tensor]:
        return torch.autograd.grad(loss(mode), targets, allow_unused=True)

    ref = [torch.zeros_like(t) if g is None else g for g, t in zip(grads(reference), targets)]
    scale = max(float(g.abs().max()) for g in ref) or 1.0
    errors: Dict[str, float] = {}
    for mode in modes:
        gs = grads(mode)
        err = 0.0
        for g, r in zip(gs, ref):
            g = torch.zeros_like(r) if g is None else g
            err = max(err, float((g - r).abs().max()) / scale)
        errors[mode] = err
    # Central finite difference of L along a random direction of every target.
    dirs = [torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in targets]
    with torch.no_grad():
        originals = [t.detach().clone() for t in targets]

        def shifted(sign: float) -> float:
            for t, o, d in zip(targets, originals, dirs):
                t.copy_(o + sign * fd_eps * d)
            return float(loss(reference))

        plus, minus = shifted(1.0), shifted(-1.0)
        for t, o in zip(targets, originals):
            t.copy_(o)
    fd = (plus - minus) / (2 * fd_eps)
    analytic = float(sum((g * d).sum() for g, d in zip(ref, dirs)))
    fd_err = abs(fd - analytic) / max(abs(analytic), 1e-12)
    return GradientCheck(
        errors=errors,
        finite_difference_error=fd_err,
        reference=reference,
        tolerance=tolerance,
        exact_modes=tuple(m for m in modes if m in exact_modes()),
    )
