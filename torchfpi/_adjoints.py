"""How gradients flow through a fixed point: every adjoint behind one protocol, one registry.

With z* = f(z*, x; theta) and an incoming gradient g = dL/dz*, the exact gradient is
dL/dtheta = (df/dtheta)^T u and dL/dx = (df/dx)^T u where u solves the adjoint fixed point

    u = g + (df/dz)^T u          (evaluated at z*).

An adjoint is an object with one method, ``solve(system) -> (u, stats)`` (:class:`Adjoint`):
it gets an :class:`AdjointSystem` (``g``, the VJP ``u -> (df/dz)^T u`` at z*, the solve
options) and returns ``u`` and optional :class:`SolveStats`. The modes differ only in how they
obtain u; all use vector-Jacobian products of f, never an explicit Jacobian (except ``"dense"``):

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

:class:`ImplicitAdjoint` solves the adjoint fixed point with any forward solver; when a higher
derivative is asked for (``create_graph``), its solve is itself a ``fixed_point`` layer, so the
next derivative is another backward FPI. ``"unroll"`` is the one mode that needs no adjoint
system: its ``records_forward = True`` tells the solve to record the forward iterations instead.

Adding a mode: write its class here (or anywhere) with ``solve(system)`` and register a name
with :func:`register_adjoint`; an object with ``solve`` can also be passed as ``backward=``.
Use ``"fpi"`` or ``"anderson"`` for training unless you know the inexact modes are good enough:
their error grows with the spectral radius of J (see :func:`torchfpi.check_gradients`).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    Hashable,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
    runtime_checkable,
)

import torch
from torch import Tensor

from torchfpi._loop import iterate
from torchfpi._solution import SolveStats, Status, report_failure
from torchfpi._solvers import FPI, Anderson, Solver, _check_unit_interval, resolve_solver

VJPFn = Callable[[Tensor], Tensor]


@dataclass
class AdjointSystem:
    """What an adjoint needs to solve ``u = g + J^T u`` at the fixed point (flat states).

    Attributes:
        g: ``(B, N)`` incoming gradient dL/dz*.
        vjp: ``u -> J^T u`` with J = df/dz at z*, ``(B, N) -> (B, N)``; differentiable when
            ``differentiable`` is True.
        differentiable: the caller asked for a graph of the gradient (``create_graph``).
        tol, max_iter: ``backward_tol`` and ``backward_max_iter`` (resolved).
        residual, compact, on_failure: as the forward solve's options.
        z: ``(B, N)`` z*; ``tensors``: the tensor inputs of f (for the implicit adjoint).
        vjp_rows: ``(u_rows, idx) -> J^T u`` on the rows ``idx`` only (first order, compact).
        vjp_at: ``(u, z, tensors) -> J^T u`` at another point, differentiable in all three.
        history: a key naming this kind of adjoint solve for the loop's window planning
            (see :func:`torchfpi._loop.iterate`), or None.
        batch_stop: ``stop="batch"``: the adjoint solve stops the whole batch at once.
    """

    g: Tensor
    vjp: VJPFn
    differentiable: bool
    tol: float
    max_iter: int
    residual: str
    compact: bool
    on_failure: str
    z: Tensor
    tensors: Sequence[Tensor]
    vjp_rows: Callable[[Tensor, Tensor], Tensor]
    vjp_at: Callable[[Tensor, Tensor, Sequence[Tensor]], Tensor]
    history: Optional[Hashable] = None
    batch_stop: bool = False

    @property
    def absolute(self) -> bool:
        """True for ``residual="absolute"``."""
        return self.residual == "absolute"


@runtime_checkable
class Adjoint(Protocol):
    """What ``fixed_point(..., backward=...)`` accepts besides a name.

    ``solve(system)`` returns ``(u, stats)``: u ``(B, N)`` (differentiable when
    ``system.differentiable``) and :class:`SolveStats` or ``None``. Optional class attributes:
    ``exact`` (bool, for :func:`torchfpi.check_gradients`) and ``records_forward`` (bool: autograd
    records the forward iterations and ``solve`` is never called).
    """

    def solve(self, system: AdjointSystem) -> Tuple[Tensor, Optional[SolveStats]]: ...


class _Implicit:
    """Shared ``solve`` of the implicit adjoints: u = g + J^T u by ``self.solver``, per sample."""

    exact: ClassVar[bool] = True
    records_forward: ClassVar[bool] = False

    @property
    def solver(self) -> Solver:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def solve(self, system: AdjointSystem) -> Tuple[Tensor, Optional[SolveStats]]:
        if system.differentiable:
            return self._solve_as_layer(system)
        g = system.g
        # Large states only: a small one's allocation costs less than the test below.
        g_mem = g.untyped_storage().data_ptr() if g.numel() > IN_PLACE_ELEMENTS else None

        def call(uw: Tensor, idx: Optional[Tensor]) -> Tensor:
            if idx is not None:
                return g[idx] + system.vjp_rows(uw, idx)
            v = system.vjp(uw)
            if g_mem is not None and _fresh(v, g, g_mem, uw):
                return v.add_(g)  # into the engine's new tensor: one allocation less an iteration
            return g + v

        u, stats = iterate(
            call, g, solver=self.solver, tol=system.tol, max_iter=system.max_iter,
            absolute=system.absolute, compact=system.compact, what="backward fixed_point",
            history=system.history, batch_stop=system.batch_stop,
        )
        report_failure(stats, system.on_failure, "backward", system.tol, system.max_iter)
        return u, stats

    def _solve_as_layer(self, system: AdjointSystem) -> Tuple[Tensor, Optional[SolveStats]]:
        # The adjoint fixed point is itself a fixed_point layer of (g, z*, inputs): its own
        # backward (this adjoint again) gives the next derivative order.
        from torchfpi._solve import fixed_point  # the solve entry point builds on this module

        def adjoint_map(u: Tensor, g_: Tensor, z_: Tensor, *t_: Tensor) -> Tensor:
            return g_ + system.vjp_at(u, z_, t_)

        sol = fixed_point(
            adjoint_map, system.g.detach(), system.g, system.z, *system.tensors,
            solver=self.solver, backward=self, tol=system.tol, max_iter=system.max_iter,
            on_failure=system.on_failure, residual=system.residual,
            stop="batch" if system.batch_stop else "sample",
        )
        return sol.value, sol.stats


IN_PLACE_ELEMENTS = 16384
"""Adjoint states with more entries (batch included) add ``g`` into the VJP in place (:func:`_fresh`)."""


def _fresh(v: Tensor, g: Tensor, g_mem: int, u: Tensor) -> bool:
    """Whether ``J^T u`` as the autograd engine returned it may take ``+ g`` in place.

    The engine's result is a new tensor for every map that really mixes z; an identity-like map
    (``z + c``, a reshape, a cast to the same dtype) hands ``u`` itself, or a view of it, back,
    and a broadcast can be a non-contiguous view: those (and anything sharing memory with ``u``
    or ``g``, or of another dtype) take the out-of-place sum. Writing into the fresh result
    saves one state-sized allocation per adjoint iteration (on the CPU the allocator's trimming
    and page faults cost a few per cent of a 128 x 256 solve)."""
    if v.requires_grad or v._base is not None or not v.is_contiguous():
        return False
    if v.dtype != g.dtype or v.shape != g.shape or v.device != g.device:
        return False
    mem = v.untyped_storage().data_ptr()
    return mem != g_mem and mem != u.untyped_storage().data_ptr()


@dataclass(frozen=True)
class ImplicitAdjoint(_Implicit):
    """The exact adjoint fixed point solved by any forward solver (a name or a solver object).

    ``FPIBackward(damping)`` is ``ImplicitAdjoint(FPI(damping))``, ``AndersonBackward(...)`` is
    ``ImplicitAdjoint(Anderson(...))``; a new solver in :mod:`torchfpi._solvers` is an adjoint
    solver here at once.

    Example:
        >>> import torch, torchfpi
        >>> x = torch.ones(1, 2, requires_grad=True)
        >>> adj = torchfpi.ImplicitAdjoint(torchfpi.FPI(damping=0.9))
        >>> z = torchfpi.fixed_point(lambda z, x: 0.5 * z + x, torch.zeros(1, 2), x, backward=adj,
        ...                         tol=1e-10).value
        >>> torch.autograd.grad(z.sum(), x)[0]        # dz*/dx = 1 / (1 - 0.5)
        tensor([[2., 2.]])
    """

    solver: Solver = FPI()  # type: ignore[assignment]  # a field here, a property in the base

    def __post_init__(self) -> None:
        # A name is resolved once: ImplicitAdjoint("anderson").solver is an Anderson object.
        object.__setattr__(self, "solver", resolve_solver(self.solver))


@dataclass(frozen=True)
class FPIBackward(_Implicit):
    """The paper's backward FPI: u <- g + J^T u (optionally damped), stopped per sample at
    ``backward_tol``. Differentiable: a second derivative solves another backward FPI.

    Args:
        damping: weight in (0, 1] of the new iterate.
    """

    damping: float = 1.0

    def __post_init__(self) -> None:
        _check_unit_interval("damping", self.damping)

    @property
    def solver(self) -> Solver:
        return FPI(damping=self.damping)


@dataclass(frozen=True)
class AndersonBackward(_Implicit):
    """The adjoint fixed point solved with Anderson acceleration (see :class:`torchfpi.Anderson`)."""

    m: int = 5
    regularization: float = 1e-8
    damping: float = 1.0

    def __post_init__(self) -> None:
        Anderson(m=self.m, regularization=self.regularization, damping=self.damping)

    @property
    def solver(self) -> Solver:
        return Anderson(m=self.m, regularization=self.regularization, damping=self.damping)


def _fixed_count_stats(g: Tensor, terms: int) -> SolveStats:
    b = g.shape[0]
    return SolveStats(
        iterations=torch.full((b,), terms, dtype=torch.int64, device=g.device),
        residual=torch.full((b,), float("nan"), dtype=g.dtype, device=g.device),
        status=torch.full((b,), int(Status.MAX_ITER), dtype=torch.int64, device=g.device),
        trace=torch.zeros(0, b, dtype=g.dtype, device=g.device),
    )


@dataclass(frozen=True)
class NeumannBackward:
    """Truncated Neumann series / recurrent backpropagation: u = sum_{k=0}^{K} (J^T)^k g.

    Inexact unless J^T{K+1} g is negligible; costs exactly ``terms`` VJPs. Differentiable
    (the terms are recorded when a second derivative is asked for).

    Args:
        terms: K, the number of VJPs (>= 1).
    """

    terms: int = 10
    exact: ClassVar[bool] = False
    records_forward: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.terms, numbers.Integral) or isinstance(self.terms, bool) or self.terms < 1:
            raise ValueError(f"terms: expected an integer >= 1, got {self.terms!r}")
        object.__setattr__(self, "terms", int(self.terms))  # numpy integers too

    def solve(self, system: AdjointSystem) -> Tuple[Tensor, Optional[SolveStats]]:
        g = system.g
        u = g
        for _ in range(self.terms):
            u = g + system.vjp(u)
        return u, _fixed_count_stats(g, self.terms)


@dataclass(frozen=True)
class OneStepBackward:
    """Jacobian-free gradient: u = g, i.e. (I - J^T)^{-1} replaced by I. Cheap and inexact."""

    exact: ClassVar[bool] = False
    records_forward: ClassVar[bool] = False

    def solve(self, system: AdjointSystem) -> Tuple[Tensor, Optional[SolveStats]]:
        return system.g, None


@dataclass(frozen=True)
class UnrollBackward:
    """Backpropagate through the recorded forward iterations (memory grows with iterations).

    A reference for the implicit modes; the forward loop is recorded by autograd, so every
    derivative order works as for any unrolled computation.
    """

    exact: ClassVar[bool] = True
    records_forward: ClassVar[bool] = True

    def solve(self, system: AdjointSystem) -> Tuple[Tensor, Optional[SolveStats]]:
        raise RuntimeError("backward='unroll' records the forward iterations; it has no adjoint system to solve")


@dataclass(frozen=True)
class DenseBackward:
    """Form the full Jacobian J of the flat state (B*N x B*N, by B*N VJPs) and solve
    (I - J^T) u = g with ``torch.linalg.solve``. Exact; a reference for small problems.
    """

    max_size: int = 4096
    exact: ClassVar[bool] = True
    records_forward: ClassVar[bool] = False

    def solve(self, system: AdjointSystem) -> Tuple[Tensor, Optional[SolveStats]]:
        g = system.g
        shape = g.shape
        n = g.numel()
        if n > self.max_size:
            raise ValueError(
                f"backward='dense': the state has {n} entries (batch x size), more than "
                f"max_size={self.max_size}; use backward='fpi' or DenseBackward(max_size=...)"
            )
        eye = torch.eye(n, dtype=g.dtype, device=g.device)
        rows = [system.vjp(eye[k].reshape(shape)).reshape(n) for k in range(n)]
        J = torch.stack(rows)  # row k = e_k^T J
        system_matrix = torch.eye(n, dtype=g.dtype, device=g.device) - J.transpose(0, 1)
        u = torch.linalg.solve(system_matrix, g.reshape(n, 1)).reshape(shape)
        return u, None


Backward = Union[FPIBackward, AndersonBackward, NeumannBackward, OneStepBackward, UnrollBackward, DenseBackward]
"""The built-in adjoint classes (kept under their public ``*Backward`` names)."""

ADJOINTS: Dict[str, Callable[[], Any]] = {
    "fpi": FPIBackward,
    "anderson": AndersonBackward,
    "neumann": NeumannBackward,
    "onestep": OneStepBackward,
    "unroll": UnrollBackward,
    "dense": DenseBackward,
}
"""The one registry of ``backward=`` names: name -> factory called with no arguments."""

BACKWARD_MODES = ADJOINTS  # the former name


def register_adjoint(name: str, factory: Callable[[], Any]) -> None:
    """Make ``backward=name`` build ``factory()`` (an object with ``solve(system)``).

    Args:
        name: a new mode name (the built-in names cannot be replaced).
        factory: a class or function of no arguments returning an :class:`Adjoint`; its
            ``exact`` attribute (default True) tells :func:`torchfpi.check_gradients` whether
            to hold it to the exact modes' tolerance.

    Raises:
        ValueError: ``name`` is taken or empty; TypeError: ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if name in ADJOINTS:
        raise ValueError(f"name: backward mode {name!r} is already registered ({sorted(ADJOINTS)})")
    if not callable(factory):
        raise TypeError(f"factory: expected a class or function of no arguments, got {type(factory).__name__}")
    ADJOINTS[name] = factory


def exact_modes() -> Tuple[str, ...]:
    """The registered names whose adjoint is exact (``exact`` attribute, default True)."""
    return tuple(name for name, make in ADJOINTS.items() if getattr(make, "exact", True))


def resolve_adjoint(backward: object) -> Adjoint:
    """A mode name or adjoint object -> an adjoint object, or a ``ValueError`` naming the choices."""
    if isinstance(backward, str):
        make = ADJOINTS.get(backward)
        if make is None:
            raise ValueError(
                f"backward: expected one of {sorted(ADJOINTS)} or an adjoint object, got {backward!r}"
            )
        return make()
    if callable(getattr(backward, "solve", None)):
        return backward  # type: ignore[return-value]
    raise ValueError(
        f"backward: expected one of {sorted(ADJOINTS)} or an adjoint object with solve(system) "
        f"(torchfpi.FPIBackward, ...), got {type(backward).__name__}"
    )


resolve_backward = resolve_adjoint  # the former name
