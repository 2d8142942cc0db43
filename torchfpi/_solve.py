"""The public entry point ``fixed_point``: validate, solve forward, attach the implicit backward."""

from __future__ import annotations

import cmath
import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from torchfpi._autograd import _grad, _is_float, find_leaves, vjp
from torchfpi._backward import Backward, UnrollBackward, resolve_backward
from torchfpi._solution import Solution, SolveStats, Status, _Record
from torchfpi._solvers import DIVERGENCE_FACTOR, FPI, Anderson, _iterate
from torchfpi.errors import ConvergenceWarning, FixedPointError

State = Union[Tensor, Tuple[Tensor, ...]]

SOLVERS = {"fpi": FPI, "anderson": Anderson}
ON_FAILURE = ("warn", "raise", "ignore")
RESIDUALS = ("relative", "absolute")


def _resolve_solver(solver: object) -> object:
    if isinstance(solver, str):
        cls = SOLVERS.get(solver)
        if cls is None:
            raise ValueError(
                f"solver: expected one of {sorted(SOLVERS)} or a solver object, got {solver!r}"
            )
        return cls()
    if callable(getattr(solver, "init", None)) and callable(getattr(solver, "step", None)):
        return solver
    raise ValueError(
        f"solver: expected one of {sorted(SOLVERS)} or a solver object with init() and step() "
        f"(torchfpi.FPI, torchfpi.Anderson), got {type(solver).__name__}"
    )


def _check_tol(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


def _check_max_iter(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return value


class _Structure:
    """Packs a state (a tensor or a tuple of tensors, batched or not) into a flat ``(B, N)``."""

    def __init__(self, z0: object, batched: bool) -> None:
        if isinstance(z0, Tensor):
            parts: Tuple[Tensor, ...] = (z0,)
            self.is_tuple = False
        elif isinstance(z0, tuple) and z0 and all(isinstance(p, Tensor) for p in z0):
            parts = z0
            self.is_tuple = True
        else:
            raise TypeError(
                "z0: expected a floating-point torch.Tensor or a non-empty tuple of them, "
                f"got {type(z0).__name__}"
            )
        for i, p in enumerate(parts):
            name = f"z0[{i}]" if self.is_tuple else "z0"
            if not p.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor, got dtype {p.dtype}")
            if p.dtype != parts[0].dtype or p.device != parts[0].device:
                raise ValueError(
                    f"{name}: every part of z0 must share dtype and device; got {p.dtype} on "
                    f"{p.device}, expected {parts[0].dtype} on {parts[0].device}"
                )
            if batched and (p.dim() == 0 or p.shape[0] != parts[0].shape[0]):
                raise ValueError(
                    f"{name}: dim 0 is the batch, so z0 needs at least one dim and every part the "
                    f"same batch size; got shape {tuple(p.shape)} (batch {parts[0].shape[:1]}). "
                    "Pass batched=False for an unbatched state."
                )
        self.batched = batched
        self.dtype = parts[0].dtype
        self.device = parts[0].device
        self.shapes = [tuple(p.shape[1:]) if batched else tuple(p.shape) for p in parts]
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        self.batch = int(parts[0].shape[0]) if batched else 1

    def pack(self, z: object) -> Tensor:
        parts = z if isinstance(z, tuple) else (z,)
        flats = []
        for p in parts:
            if self.batched and p.dim() == 2:
                flats.append(p)  # already flat: no view node in the graph
            else:
                flats.append(p.reshape(p.shape[0], -1) if self.batched else p.reshape(1, -1))
        return flats[0] if len(flats) == 1 else torch.cat(flats, dim=1)

    def unpack(self, flat: Tensor) -> State:
        b = flat.shape[0]
        chunks = flat.split(self.sizes, dim=1) if len(self.sizes) > 1 else (flat,)
        parts = tuple(
            (c if len(s) == 1 and c.dim() == 2 else c.reshape(b, *s)) if self.batched else c.reshape(s)
            for c, s in zip(chunks, self.shapes)
        )
        return parts if self.is_tuple else parts[0]

    def check_output(self, out: object, batch: int) -> None:
        """Raise ``ValueError`` unless ``out`` has the structure of the state (batch ``batch``)."""
        if self.is_tuple:
            if not isinstance(out, tuple) or len(out) != len(self.shapes):
                raise ValueError(
                    f"f must return a tuple of {len(self.shapes)} tensors like z0, got "
                    f"{type(out).__name__}{'' if not isinstance(out, tuple) else f' of {len(out)}'}"
                )
            parts = out
        else:
            if not isinstance(out, Tensor):
                raise ValueError(f"f must return a tensor like z0, got {type(out).__name__}")
            parts = (out,)
        for i, (p, shape) in enumerate(zip(parts, self.shapes)):
            name = f"f's output[{i}]" if self.is_tuple else "f's output"
            if not isinstance(p, Tensor):
                raise ValueError(f"{name}: expected a tensor, got {type(p).__name__}")
            expected = ((batch,) + shape) if self.batched else shape
            if tuple(p.shape) != expected:
                raise ValueError(
                    f"{name} has shape {tuple(p.shape)}, expected shape {expected} (the shape of z0)"
                )
            if p.dtype != self.dtype:
                raise ValueError(f"{name} has dtype {p.dtype}, expected z0's dtype {self.dtype}")
            if p.device != self.device:
                raise ValueError(f"{name} is on device {p.device}, expected z0's device {self.device}")


class _Problem:
    """Everything the forward solve and the backward node need, minus the tensors themselves."""

    def __init__(
        self,
        f: Callable[..., Any],
        structure: _Structure,
        template: List[Any],
        tensor_slots: List[int],
        *,
        solver: object,
        strategy: Backward,
        tol: float,
        max_iter: int,
        backward_tol: float,
        backward_max_iter: int,
        on_failure: str,
        absolute: bool,
        compact: bool,
        record: _Record,
    ) -> None:
        self.f = f
        self.structure = structure
        self.template = template
        self.tensor_slots = tensor_slots
        self.solver = solver
        self.strategy = strategy
        self.tol = tol
        self.max_iter = max_iter
        self.backward_tol = backward_tol
        self.backward_max_iter = backward_max_iter
        self.on_failure = on_failure
        self.absolute = absolute
        self.compact = compact
        self.record = record
        self._checked_batch = -1  # f's output structure is fully checked once per batch size
        self._plain = (
            not structure.is_tuple
            and structure.batched
            and len(structure.shapes[0]) == 1
            and len(tensor_slots) == len(template)
        )

    # -- the map on flat states ------------------------------------------------------------
    def fn(self, zf: Tensor, *tensors: Tensor) -> Tensor:
        st = self.structure
        if self._plain:
            # Common case (a flat (B, N) state, every input a tensor): call f directly.
            out = self.f(zf, *tensors)
            if self._checked_batch == zf.shape[0] and isinstance(out, Tensor) and out.shape == zf.shape and out.dtype == zf.dtype:
                return out
        else:
            args = list(self.template)
            for slot, t in zip(self.tensor_slots, tensors):
                args[slot] = t
            out = self.f(st.unpack(zf), *args)
        st.check_output(out, zf.shape[0])
        self._checked_batch = zf.shape[0]
        return st.pack(out)

    def _sliced(self, tensors: Sequence[Tensor], idx: Optional[Tensor]) -> Sequence[Tensor]:
        if idx is None:
            return tensors
        b = self.structure.batch
        return [t[idx] if (t.dim() >= 1 and t.shape[0] == b) else t for t in tensors]

    # -- forward ---------------------------------------------------------------------------
    def solve(self, z0f: Tensor, fz1: Optional[Tensor], tensors: Sequence[Tensor]) -> Tensor:
        def call(zw: Tensor, idx: Optional[Tensor]) -> Tensor:
            return self.fn(zw, *self._sliced(tensors, idx))

        zf, stats = _iterate(
            call,
            z0f,
            solver=self.solver,
            tol=self.tol,
            max_iter=self.max_iter,
            absolute=self.absolute,
            compact=self.compact,
            first_fz=fz1,
            what="fixed_point",
        )
        self.record.stats = stats
        _report(stats, self.on_failure, "forward", self.tol, self.max_iter)
        return zf

    # -- backward --------------------------------------------------------------------------
    def record_graph(self, zs: Tensor, tensors: Sequence[Tensor], needs: Sequence[bool]) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """One call of f at z* with grad, on detached copies: the graph the backward VJPs use.

        Recorded in the forward, so the backward differentiates exactly the function the forward
        solved, even if f's parameters are swapped afterwards (``torch.func.functional_call``).
        """
        with torch.enable_grad():
            zd = zs.detach().requires_grad_(True)
            td = [
                t.detach().requires_grad_(True) if (needs[i] and _is_float(t)) else t.detach()
                for i, t in enumerate(tensors)
            ]
            y = self.fn(zd, *td)
        return y, zd, td

    def backward(
        self,
        g: Tensor,
        zs: Tensor,
        tensors: Sequence[Tensor],
        params: Sequence[Tensor],
        needs: Sequence[bool],
        graph: Tuple[Tensor, Tensor, List[Tensor]],
    ) -> List[Optional[Tensor]]:
        n_t = len(tensors)
        wrt = [i for i, need in enumerate(needs) if need]
        out: List[Optional[Tensor]] = [None] * (n_t + len(params))
        if not wrt:
            return out
        strategy = self.strategy
        if not torch.is_grad_enabled():
            # First-order backward: VJPs on the one graph of f recorded at z* in the forward.
            y, zd, td = graph
            outs, wrt_z = (y,), (zd,)

            def vjp_z(u: Tensor) -> Tensor:
                # Called once per adjoint iteration: torch.autograd.grad without the wrapper.
                if not y.requires_grad:
                    return torch.zeros_like(u)
                r = torch.autograd.grad(outs, wrt_z, (u,), retain_graph=True, allow_unused=True)[0]
                return torch.zeros_like(u) if r is None else r

            u, bstats = self._adjoint(vjp_z, g, zs, tensors)
            everything = list(td) + list(params)
            grads = _grad([y], [everything[i] for i in wrt], [u], create_graph=False)
        else:
            # Differentiable backward: partial derivatives as _VJP nodes; the adjoint fixed point
            # is itself a fixed_point layer, so the next derivative is another backward FPI.
            fn_t = self._fn_tuple
            tensors = list(tensors)

            def vjp_z(u: Tensor) -> Tensor:
                return vjp(fn_t, [u], [zs, *tensors], params, wrt=[0])[0]

            if strategy.solver is not None:
                def adjoint_map(u: Tensor, g_: Tensor, z_: Tensor, *t_: Tensor) -> Tensor:
                    return g_ + vjp(fn_t, [u], [z_, *t_], params, wrt=[0])[0]

                sol = fixed_point(
                    adjoint_map,
                    g.detach(),
                    g,
                    zs,
                    *tensors,
                    solver=strategy.solver,
                    backward=strategy,
                    tol=self.backward_tol,
                    max_iter=self.backward_max_iter,
                    on_failure=self.on_failure,
                    residual="absolute" if self.absolute else "relative",
                )
                u, bstats = sol.value, sol.stats  # type: ignore[assignment]
            else:
                u, bstats = strategy.solve(vjp_z, g)  # type: ignore[union-attr]
            grads = list(vjp(fn_t, [u], [zs, *tensors], params, wrt=[1 + i for i in wrt], strict=True))
        self.record.backward = bstats
        for i, gr in zip(wrt, grads):
            out[i] = gr
        return out

    def _fn_tuple(self, z: Tensor, *tensors: Tensor) -> Tuple[Tensor]:
        return (self.fn(z, *tensors),)

    def _adjoint(
        self,
        vjp_z: Callable[[Tensor], Tensor],
        g: Tensor,
        zs: Optional[Tensor] = None,
        tensors: Sequence[Tensor] = (),
    ) -> Tuple[Tensor, Optional[SolveStats]]:
        strategy = self.strategy
        if strategy.solver is None:
            return strategy.solve(vjp_z, g)  # type: ignore[union-attr]
        compact = self.compact and zs is not None
        # With compaction, stopped samples leave the adjoint solve too: once the working rows
        # fall to half the rows of the graph in use, f is recorded again on those rows only.
        graph_rows: Optional[Tensor] = None  # rows of the graph in use (None: the full graph)
        sub: Optional[Tuple[Tensor, Tensor]] = None
        pos: Optional[Tensor] = None  # position of each working row inside graph_rows

        def call(uw: Tensor, idx: Optional[Tensor]) -> Tensor:
            nonlocal graph_rows, sub, pos
            if idx is None:
                return g + vjp_z(uw)
            if graph_rows is None or 2 * idx.shape[0] <= graph_rows.shape[0]:
                with torch.enable_grad():
                    zd = zs[idx].detach().requires_grad_(True)  # type: ignore[index]
                    y = self.fn(zd, *[t.detach() for t in self._sliced(tensors, idx)])
                graph_rows, sub, pos = idx, (y, zd), None
            elif pos is None or pos.shape[0] != idx.shape[0]:
                lookup = torch.full((self.structure.batch,), -1, dtype=torch.long, device=idx.device)
                lookup[graph_rows] = torch.arange(graph_rows.shape[0], device=idx.device)
                pos = lookup[idx]
            y, zd = sub  # type: ignore[misc]
            if pos is None:
                r = _grad([y], [zd], [uw], create_graph=False)[0]
            else:
                full = uw.new_zeros(y.shape)
                full[pos] = uw
                r = _grad([y], [zd], [full], create_graph=False)[0]
                r = None if r is None else r[pos]
            return g[idx] + (torch.zeros_like(uw) if r is None else r)

        u, stats = _iterate(
            call,
            g,
            solver=strategy.solver,
            tol=self.backward_tol,
            max_iter=self.backward_max_iter,
            absolute=self.absolute,
            compact=compact,
            what="backward fixed_point",
        )
        _report(stats, self.on_failure, "backward", self.backward_tol, self.backward_max_iter)
        return u, stats


def _report(stats: SolveStats, on_failure: str, which: str, tol: float, max_iter: int) -> None:
    if on_failure == "ignore":
        return
    status = stats.status
    n = int(status.numel())
    # One transfer and host counts (this runs after every solve).
    codes = status.detach().cpu().tolist()
    n_div = codes.count(int(Status.DIVERGED))
    n_max = codes.count(int(Status.MAX_ITER))
    if n_div == 0 and n_max == 0:
        return
    knob_iter = "max_iter" if which == "forward" else "backward_max_iter"
    knob_tol = "tol" if which == "forward" else "backward_tol"
    parts = []
    if n_div:
        first = int(stats.iterations[status == Status.DIVERGED].min())
        parts.append(
            f"{n_div} of {n} samples diverged (residual grew over {DIVERGENCE_FACTOR:.0e}-fold, "
            f"first at iteration {first}): the map is not a contraction there; use damping "
            "(torchfpi.FPI(damping=0.5)), a smaller step size, spectral normalisation, and check "
            "torchfpi.spectral_radius(...) < 1"
        )
    if n_max:
        worst = float(stats.residual[status == Status.MAX_ITER].max())
        hint = (
            "raise max_iter, use solver='anderson' or damping, or loosen tol"
            if which == "forward"
            else "raise backward_max_iter, use backward='anderson', or loosen backward_tol"
        )
        parts.append(
            f"{n_max} of {n} samples did not converge within {knob_iter}={max_iter} (worst "
            f"residual {worst:.2e} > {knob_tol}={tol:.1e}): the map may contract slowly "
            f"(spectral radius near 1); {hint}"
        )
    msg = f"{which} fixed-point solve: " + "; ".join(parts)
    if on_failure == "raise":
        raise FixedPointError(msg)
    warnings.warn(msg, ConvergenceWarning, stacklevel=4)


class _FixedPointFunction(torch.autograd.Function):
    """Forward: solve without a graph. Backward: the adjoint solve of ``problem.strategy``."""

    @staticmethod
    def forward(ctx, problem, z0f, fz1, *rest):  # type: ignore[override]
        n_t = len(problem.tensor_slots)
        zf = problem.solve(z0f, fz1, rest[:n_t])
        ctx.problem = problem
        ctx.n_t = n_t
        ctx.graph = problem.record_graph(zf, rest[:n_t], ctx.needs_input_grad[3 : 3 + n_t])
        ctx.save_for_backward(zf, *rest)
        return zf

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        zs, *rest = ctx.saved_tensors
        n_t = ctx.n_t
        needs = ctx.needs_input_grad[3:]
        grads = ctx.problem.backward(g, zs, rest[:n_t], rest[n_t:], needs, ctx.graph)
        return (None, None, None, *grads)


def _check_finite(z0f: Tensor, inputs: Sequence[Tuple[int, Tensor]]) -> None:
    """Raise :class:`FixedPointError` if z0 or a floating input holds NaN or Inf.

    One reduction per tensor and one host sync in all: a sum is finite iff every entry is,
    unless finite entries overflow it, in which case the exact elementwise test decides.
    """
    named = [("z0", z0f)] + [(f"inputs[{i}]", t) for i, t in inputs]
    if all(t.device.type == "cpu" for _, t in named):
        # No device sync to save on the CPU: a Python float per tensor is cheapest.
        if all(cmath.isfinite(t.detach().sum().item()) for _, t in named):
            return
    else:
        sums = torch.stack([t.detach().sum().to(torch.float64).cpu() for _, t in named])
        if bool(torch.isfinite(sums).all()):
            return
    for name, t in named:
        if not bool(torch.isfinite(t).all()):
            raise FixedPointError(f"fixed_point: {name} contains NaN or Inf (at iteration 0, before solving)")


def _validate_options(
    solver: object,
    backward: object,
    tol: object,
    max_iter: object,
    backward_tol: object,
    backward_max_iter: object,
    on_failure: object,
    residual: object,
    compact: object,
    batched: object,
) -> Tuple[object, Backward, float, int, float, int]:
    """Check every option of :func:`fixed_point`; return (solver, strategy, tol, max_iter,
    backward_tol, backward_max_iter) with the ``None`` defaults resolved."""
    solver_obj = _resolve_solver(solver)
    strategy = resolve_backward(backward)
    tol_ = _check_tol("tol", tol)
    max_iter_ = _check_max_iter("max_iter", max_iter)
    btol = tol_ if backward_tol is None else _check_tol("backward_tol", backward_tol)
    bmax = max_iter_ if backward_max_iter is None else _check_max_iter("backward_max_iter", backward_max_iter)
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure: expected one of {list(ON_FAILURE)}, got {on_failure!r}")
    if residual not in RESIDUALS:
        raise ValueError(f"residual: expected one of {list(RESIDUALS)}, got {residual!r}")
    if not isinstance(compact, bool):
        raise TypeError(f"compact: expected a bool, got {type(compact).__name__}")
    if not isinstance(batched, bool):
        raise TypeError(f"batched: expected a bool, got {type(batched).__name__}")
    return solver_obj, strategy, tol_, max_iter_, btol, bmax


def fixed_point(
    f: Callable[..., Any],
    z0: State,
    *inputs: Any,
    solver: Union[str, object] = "fpi",
    backward: Union[str, Backward] = "fpi",
    tol: float = 1e-6,
    max_iter: int = 100,
    backward_tol: Optional[float] = None,
    backward_max_iter: Optional[int] = None,
    on_failure: str = "warn",
    residual: str = "relative",
    compact: bool = False,
    batched: bool = True,
) -> Solution:
    r"""Solve z* = f(z*, \*inputs) by iteration, differentiably: the forward FPI layer.

    The forward solve iterates ``z <- f(z, *inputs)`` (or an accelerated variant) without
    recording a graph, so memory does not grow with the iteration count. Each sample (dim 0 of
    the state) stops on its own when its residual ``||f(z) - z|| / (||f(z)|| + 1e-9)`` falls
    below ``tol``, and is then frozen: its result does not depend on the rest of the batch.
    Gradients come from the backward FPI layer: ``u = g + (df/dz)^T u`` solved with
    vector-Jacobian products, then ``dL/dx = (df/dx)^T u`` for every input and every tensor ``f``
    uses (``nn.Module`` parameters and captured tensors alike). The backward is itself
    differentiable: a second derivative solves another backward fixed point.

    Args:
        f: the map, ``f(z, *inputs) -> z_like``; a function or an ``nn.Module``. It may call
            ``torch.autograd.grad`` (e.g. an energy gradient step), and must be deterministic.
        z0: initial iterate, ``(B, *S)`` floating tensor or a tuple of such tensors (then ``f``
            takes and returns a tuple). ``z0`` receives no gradient: the fixed point does not
            depend on it.
        *inputs: further arguments of ``f``; floating tensors among them receive gradients.
        solver: ``"fpi"``, ``"anderson"`` or a solver object (:class:`FPI`, :class:`Anderson`).
        backward: ``"fpi"`` (default, exact), ``"anderson"`` (exact), ``"neumann"``, ``"onestep"``
            (inexact), ``"unroll"``, ``"dense"`` (references), or a strategy object.
        tol: residual tolerance (> 0), relative unless ``residual="absolute"``.
        max_iter: iteration budget (calls of ``f``) per sample.
        backward_tol: tolerance of the adjoint solve (and of second-order adjoints); ``None``
            means ``tol``. Ignored by modes without an iterative solve.
        backward_max_iter: budget of the adjoint solve; ``None`` means ``max_iter``.
        on_failure: what a sample that did not converge or diverged triggers, forward or
            backward: ``"warn"`` (:class:`ConvergenceWarning`), ``"raise"``
            (:class:`FixedPointError`) or ``"ignore"``. NaN/Inf always raise.
        residual: ``"relative"`` or ``"absolute"`` (``||f(z) - z||``).
        compact: drop stopped samples from the batch ``f`` sees. Only valid if ``f`` treats
            samples independently; inputs whose dim 0 equals the batch size are sliced along.
        batched: ``False`` if ``z0`` has no batch dimension (it is then treated as one sample).

    Returns:
        A :class:`Solution`: ``value`` (z*, like ``z0``), ``iterations``, ``residual``,
        ``converged``, ``status`` (each ``(B,)``), ``trace`` ``(T, B)``, ``backward`` stats.

    Raises:
        TypeError: ``z0`` not a floating tensor (or tuple of them); unknown keyword arguments.
        ValueError: an invalid option, or ``f`` returning another shape, dtype or device.
        FixedPointError: NaN/Inf in ``z0``, the inputs or ``f``'s output (naming the
            iteration), or non-convergence / divergence with ``on_failure="raise"``.

    Example:
        >>> import torch, torchfpi
        >>> x = torch.tensor([[1.0, 2.0]], requires_grad=True)
        >>> sol = torchfpi.fixed_point(lambda z, x: 0.5 * z + x, torch.zeros(1, 2), x, tol=1e-10)
        >>> sol.value                                  # z* = 2 x
        tensor([[2., 4.]], grad_fn=<_FixedPointFunctionBackward>)
        >>> sol.value.sum().backward(); x.grad         # dz*/dx = 1 / (1 - 0.5)
        tensor([[2., 2.]])
    """
    if not callable(f):
        raise TypeError(f"f: expected a callable (function or nn.Module), got {type(f).__name__}")
    solver_obj, strategy, tol, max_iter, btol, bmax = _validate_options(
        solver, backward, tol, max_iter, backward_tol, backward_max_iter, on_failure, residual, compact, batched
    )
    structure = _Structure(z0, batched)
    z0f = structure.pack(z0).detach()
    template = list(inputs)
    slots = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
    tensors = [inputs[i] for i in slots]
    _check_finite(z0f, [(i, inputs[i]) for i in slots if _is_float(inputs[i])])
    record = _Record()
    problem = _Problem(
        f,
        structure,
        template,
        slots,
        solver=solver_obj,
        strategy=strategy,
        tol=tol,
        max_iter=max_iter,
        backward_tol=btol,
        backward_max_iter=bmax,
        on_failure=on_failure,
        absolute=residual == "absolute",
        compact=compact,
        record=record,
    )
    grad_on = torch.is_grad_enabled()
    if grad_on and isinstance(strategy, UnrollBackward):
        zf = problem.solve(z0f, None, tensors)  # recorded: autograd unrolls the iterations
        return Solution(structure.unpack(zf), record)
    # The first call of f validates its output and, with grad on, reveals the tensors f uses
    # through its closure (parameters, captured tensors): they become inputs of the node.
    # z enters that call as a leaf requiring grad, so that an f which differentiates w.r.t. z
    # (an energy step) does not create leaves of its own that would look like parameters.
    detached = [t.detach() for t in tensors]
    zc = z0f.detach().requires_grad_(True) if grad_on else z0f
    fz1 = problem.fn(zc, *detached)
    params = find_leaves([fz1], exclude=[zc]) if grad_on else []
    fz1 = fz1.detach()
    differentiable = grad_on and (bool(params) or any(t.requires_grad for t in tensors))
    if differentiable:
        zf = _FixedPointFunction.apply(problem, z0f, fz1, *tensors, *params)
    else:
        with torch.no_grad():
            zf = problem.solve(z0f, fz1, detached)
    return Solution(structure.unpack(zf), record)


class FPILayer(nn.Module):
    r"""``nn.Module`` form of :func:`fixed_point`: ``forward(*inputs, z0=None) -> z*``.

    ``f`` is registered as a sub-module when it is one, so its parameters belong to the layer.
    The latest :class:`Solution` is kept in ``last_solution`` for inspection.

    Args:
        f: the map ``f(z, *inputs)``.
        init: optional ``init(*inputs) -> z0`` used when ``forward`` gets no ``z0``.
        solver, backward, tol, max_iter, backward_tol, backward_max_iter, on_failure,
        residual, compact, batched: as in :func:`fixed_point`.

    Example:
        >>> import torch, torchfpi
        >>> lin = torch.nn.Linear(3, 3)
        >>> with torch.no_grad(): _ = lin.weight.mul_(0.1)
        >>> layer = torchfpi.FPILayer(lambda z, x: torch.tanh(lin(z)) + x,
        ...                           init=lambda x: torch.zeros_like(x))
        >>> z = layer(torch.randn(4, 3)); z.shape, bool(layer.last_solution.converged.all())
        (torch.Size([4, 3]), True)
    """

    def __init__(
        self,
        f: Callable[..., Any],
        *,
        init: Optional[Callable[..., State]] = None,
        solver: Union[str, object] = "fpi",
        backward: Union[str, Backward] = "fpi",
        tol: float = 1e-6,
        max_iter: int = 100,
        backward_tol: Optional[float] = None,
        backward_max_iter: Optional[int] = None,
        on_failure: str = "warn",
        residual: str = "relative",
        compact: bool = False,
        batched: bool = True,
    ) -> None:
        super().__init__()
        if not callable(f):
            raise TypeError(f"f: expected a callable (function or nn.Module), got {type(f).__name__}")
        self.f = f
        self.init = init
        # Validate the options now rather than at the first call.
        _validate_options(
            solver, backward, tol, max_iter, backward_tol, backward_max_iter, on_failure, residual, compact, batched
        )
        self.options = dict(
            solver=solver,
            backward=backward,
            tol=tol,
            max_iter=max_iter,
            backward_tol=backward_tol,
            backward_max_iter=backward_max_iter,
            on_failure=on_failure,
            residual=residual,
            compact=compact,
            batched=batched,
        )
        self.last_solution: Optional[Solution] = None

    def solve(self, *inputs: Any, z0: Optional[State] = None) -> Solution:
        """Run the solve and return the full :class:`Solution` (also kept in ``last_solution``)."""
        sol = fixed_point(self.map, self.initial_state(inputs, z0), *inputs, **self.options)
        self.last_solution = sol
        return sol

    def initial_state(self, inputs: Sequence[Any], z0: Optional[State]) -> State:
        """``z0`` if given, else ``init(*inputs)``; a clear error if neither is available."""
        if z0 is not None:
            return z0
        if self.init is None:
            raise ValueError("z0: this layer has no init function, so forward() needs z0=...")
        return self.init(*inputs)

    def map(self, z: State, *inputs: Any) -> State:
        """The fixed-point map f(z, \\*inputs) of this layer."""
        return self.f(z, *inputs)

    def forward(self, *inputs: Any, z0: Optional[State] = None) -> State:  # noqa: D401
        """z* for these inputs (starting from ``z0`` or ``init(*inputs)``)."""
        return self.solve(*inputs, z0=z0).value
