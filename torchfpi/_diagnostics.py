"""Gradient checks: every backward mode against a reference and finite differences."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from torchfpi._adjoints import ADJOINTS, exact_modes
from torchfpi._options import check_integer, check_positive
from torchfpi._spectral import _state_parts


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
        hints: what may explain a failed check (a low precision, a solve that did not
            converge); printed by :meth:`table`.
    """

    errors: Dict[str, float]
    finite_difference_error: float
    reference: str
    tolerance: float
    exact_modes: Sequence[str] = field(default_factory=tuple)
    hints: Tuple[str, ...] = ()

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
        lines.extend(f"hint: {h}" for h in self.hints)
        return "\n".join(lines)


EXACT_MODES = exact_modes()
"""The built-in exact modes (registered adjoints are looked up when ``check_gradients`` runs)."""


def _gradcheck_modes(modes: object) -> Tuple[str, ...]:
    if isinstance(modes, str) or not isinstance(modes, (tuple, list)):
        raise TypeError(
            "modes: expected a tuple or list of backward mode names such as ('fpi', 'dense'), "
            f"got {type(modes).__name__} {modes!r}"
        )
    if not all(isinstance(m, str) for m in modes):
        raise TypeError(f"modes: expected mode names (strings), got {modes!r}")
    if not modes:
        raise ValueError("modes: expected at least one backward mode name, got an empty sequence")
    return tuple(modes)


def _low_precision_hint(eps: float, tolerance: float) -> str:
    return (
        f"computed in a low precision (rounding eps {eps:.1e}): the solves and the finite "
        f"differences are only accurate to about {eps ** (2 / 3):.0e}, so errors above "
        f"tolerance={tolerance:g} may be rounding, not a wrong gradient; check in float64 "
        "(z0, the inputs and f's parameters converted with .double())"
    )


def _finite_difference_error(
    loss: Callable[[], Tensor], targets: Sequence[Tensor], grads: Sequence[Tensor], step: float,
    gen: torch.Generator,
) -> float:
    """Relative error of <grads, d> against a central difference of ``loss`` along random d.

    Shifts ``targets`` in place and always restores them (also when ``loss`` raises).
    """
    dirs = [torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in targets]
    originals = [t.detach().clone() for t in targets]
    values = []
    try:
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for t, o, d in zip(targets, originals, dirs):
                    t.copy_(o + sign * step * d)
                values.append(float(loss()))
    finally:
        with torch.no_grad():
            for t, o in zip(targets, originals):
                t.copy_(o)
    fd = (values[0] - values[1]) / (2 * step)
    analytic = float(sum((g * d).sum() for g, d in zip(grads, dirs)))
    return abs(fd - analytic) / max(abs(analytic), 1e-12)


def check_gradients(
    f: Callable[..., Tensor],
    z0: Union[Tensor, Tuple[Tensor, ...]],
    *inputs: Any,
    modes: Sequence[str] = tuple(ADJOINTS),
    reference: Optional[str] = None,
    tol: float = 1e-10,
    max_iter: int = 1000,
    tolerance: float = 1e-5,
    fd_eps: Optional[float] = None,
    seed: int = 0,
) -> GradientCheck:
    r"""Compare the gradients of every backward mode with each other and finite differences.

    Uses the loss L = <w, z*> with a random ``w``, and reports for each mode the relative error
    ``max |g - g_ref| / max |g_ref|`` over the floating inputs that require grad (and the
    parameters of ``f`` if it is an ``nn.Module``). The reference (``"dense"`` when the state
    has at most 512 entries in all, else ``"fpi"``) is checked against a central finite
    difference of L along a random direction. Use float64 for meaningful numbers: in a lower
    precision a failed check carries a hint saying so (:attr:`GradientCheck.hints`, printed by
    :meth:`GradientCheck.table`). Works under ``torch.no_grad()`` and
    ``torch.inference_mode()``: the check differentiates by design, so grad is enabled locally.

    Args:
        f: the map ``f(z, *inputs)`` (a function or an ``nn.Module``).
        z0: ``(B, *S)`` floating initial iterate with B >= 1, or a tuple of such tensors (then
            ``f`` takes and returns a tuple, as in :func:`torchfpi.fixed_point`).
        *inputs: further arguments of ``f``; the floating ones requiring grad are checked.
        modes: backward modes to compare (names as in ``fixed_point(backward=...)``).
        reference: the mode the others are compared with (default: see above).
        tol: forward (and backward) solver tolerance, a finite number > 0.
        max_iter: solver iteration limit, an integer >= 1.
        tolerance: largest relative error accepted for the exact modes and the finite
            difference, a finite number > 0.
        fd_eps: finite-difference step, a finite number > 0; default eps^(1/3) of the
            lowest-precision dtype involved (6.1e-6 in float64, 4.9e-3 in float32), which
            balances truncation and rounding error of the central difference.
        seed: seed of the random loss weights and direction (an integer).

    Returns:
        A :class:`GradientCheck`; ``.ok`` says whether the exact modes agree. The checked
        tensors are shifted in place for the finite difference and always restored.

    Raises:
        TypeError: ``f`` not callable; ``z0`` not a floating tensor or tuple of them; ``modes``
            not a tuple or list of names; an option of the wrong type (bool is not a number).
        ValueError: ``z0`` 0-dim or batch 0; no input or parameter requires grad; an option
            out of range (``fd_eps`` <= 0, NaN, inf, ...); no mode or an unknown mode name.

    Example:
        >>> import torch, torchfpi
        >>> x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
        >>> rep = torchfpi.check_gradients(lambda z, x: 0.5 * torch.tanh(z) + x,
        ...                                torch.zeros(2, 3, dtype=torch.float64), x)
        >>> rep.ok
        True
    """
    from torchfpi._solve import fixed_point

    if not callable(f):
        raise TypeError(f"f: expected a callable f(z, *inputs), got {type(f).__name__}")
    parts = _state_parts(z0, "z0")
    if parts[0].shape[0] == 0:
        raise ValueError(f"z0: expected shape (B, *S) with a batch B >= 1, got {tuple(parts[0].shape)}")
    modes = _gradcheck_modes(modes)
    if reference is not None and not isinstance(reference, str):
        raise TypeError(f"reference: expected a mode name or None, got {type(reference).__name__}")
    tol = check_positive("tol", tol)
    max_iter = check_integer("max_iter", max_iter, minimum=1)
    tolerance = check_positive("tolerance", tolerance)
    step = None if fd_eps is None else check_positive("fd_eps", fd_eps)
    seed = check_integer("seed", seed, minimum=None)
    params = list(f.parameters()) if isinstance(f, torch.nn.Module) else []
    targets = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad] + [
        p for p in params if p.requires_grad
    ]
    if not targets:
        raise ValueError("inputs: check_gradients needs at least one input (or parameter) requiring grad")
    if reference is None:
        reference = "dense" if sum(p.numel() for p in parts) <= 512 else "fpi"
    eps = max(torch.finfo(t.dtype).eps for t in (*parts, *targets) if t.is_floating_point())
    step = eps ** (1 / 3) if step is None else step
    with torch.inference_mode(False), torch.enable_grad():
        # Tensors made under torch.inference_mode() cannot enter a graph: use ordinary copies.
        parts = tuple(p.clone() if p.is_inference() else p for p in parts)
        start = parts if isinstance(z0, tuple) else parts[0]
        args = [t.clone() if isinstance(t, Tensor) and t.is_inference() else t for t in inputs]
        gen = torch.Generator(device="cpu").manual_seed(seed)
        weights = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in parts]
        converged = [True]

        def loss(mode: str) -> Tensor:
            sol = fixed_point(f, start, *args, backward=mode, tol=tol, max_iter=max_iter, on_failure="ignore")
            converged[0] = converged[0] and bool(sol.converged.all())
            value = sol.value if isinstance(sol.value, tuple) else (sol.value,)
            return sum((v * w).sum() for v, w in zip(value, weights))  # type: ignore[return-value]

        grads = {m: torch.autograd.grad(loss(m), targets, allow_unused=True) for m in dict.fromkeys((reference, *modes))}
        ref = [torch.zeros_like(t) if g is None else g for g, t in zip(grads[reference], targets)]
        scale = max((float(g.abs().max()) for g in ref if g.numel()), default=0.0) or 1.0
        errors: Dict[str, float] = {}
        for mode in modes:
            errors[mode] = max(
                (float((r - (0 if g is None else g)).abs().max()) / scale
                 for g, r in zip(grads[mode], ref) if r.numel()),
                default=0.0,
            )
        fd_err = _finite_difference_error(lambda: loss(reference), targets, ref, step, gen)
    report = GradientCheck(
        errors=errors,
        finite_difference_error=fd_err,
        reference=reference,
        tolerance=tolerance,
        exact_modes=tuple(m for m in modes if m in exact_modes()),
    )
    if not report.ok:
        if not converged[0]:
            report.hints += (
                f"a forward solve did not reach tol={tol:g} within max_iter={max_iter}: raise "
                "max_iter or tol, or check that f contracts (torchfpi.spectral_radius < 1)",
            )
        if eps > torch.finfo(torch.float64).eps:
            report.hints += (_low_precision_hint(eps, tolerance),)
    return report
