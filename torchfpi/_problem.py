"""The problem a solve works on: the state's structure, the map on flat states, the autograd node.

``fixed_point`` packs the state (a tensor or a tuple of tensors) into a flat ``(B, N)`` matrix
(:class:`_Structure`), wraps ``f`` as a map on flat states (:class:`Problem`) and, when
gradients are needed, attaches :class:`_FixedPointFunction`, whose backward hands an
:class:`~torchfpi._adjoints.AdjointSystem` to the adjoint of the solve's options.

Per-sample inputs: with ``compact=True`` the loop drops stopped samples, and only the tensor
inputs in ``Problem.sample_slots`` (the inputs declared per-sample) are sliced along with them;
every other input is shared and passed whole.
"""

from __future__ import annotations

from typing import Any, Callable, FrozenSet, List, Optional, Sequence, Tuple, Union

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from torchfpi._adjoints import AdjointSystem
from torchfpi._autograd import _grad, _is_float, vjp
from torchfpi._graph import GraphBlock, NotCapturable
from torchfpi._loop import history_key, iterate, iterate_graph, map_identity
from torchfpi._options import Options
from torchfpi._solution import _Record, report_failure, warn_user
from torchfpi._solvers import FPI

State = Union[Tensor, Tuple[Tensor, ...]]
Graph = Tuple[Tensor, Tensor, List[Tensor]]


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


class Problem:
    """Everything the forward solve and the backward node need, minus the tensors themselves.

    Args:
        f: the user's map. structure: the state's :class:`_Structure`.
        template: ``f``'s extra arguments; ``tensor_slots`` the positions of the tensors among
            them (the tensors themselves travel separately, through the autograd node).
        sample_slots: indices into the tensor list of the per-sample inputs (sliced by compact).
        options: the validated :class:`Options`. record: where the statistics go.
    """

    def __init__(
        self,
        f: Callable[..., Any],
        structure: _Structure,
        template: List[Any],
        tensor_slots: List[int],
        sample_slots: FrozenSet[int],
        options: Options,
        record: _Record,
    ) -> None:
        self.f = f
        self.structure = structure
        self.template = template
        self.tensor_slots = tensor_slots
        self.sample_slots = sample_slots
        self.options = options
        self.adjoint = options.adjoint
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
            if (
                self._checked_batch == zf.shape[0]
                and isinstance(out, Tensor)
                and out.shape == zf.shape
                and out.dtype == zf.dtype
            ):
                return out
        else:
            args = list(self.template)
            for slot, t in zip(self.tensor_slots, tensors):
                args[slot] = t
            out = self.f(st.unpack(zf), *args)
        st.check_output(out, zf.shape[0])
        self._checked_batch = zf.shape[0]
        return st.pack(out)

    def fn_tuple(self, z: Tensor, *tensors: Tensor) -> Tuple[Tensor]:
        return (self.fn(z, *tensors),)

    def sliced(self, tensors: Sequence[Tensor], idx: Optional[Tensor]) -> Sequence[Tensor]:
        """The tensors for the working rows ``idx``: per-sample ones sliced, shared ones whole."""
        if idx is None or not self.sample_slots:
            return tensors
        return [t[idx] if i in self.sample_slots else t for i, t in enumerate(tensors)]

    def history_key(self, which: str, z: Tensor) -> Any:
        """What names this solve for the loop's window planning (see :func:`iterate`)."""
        o = self.options
        tol, budget, solver = (
            (o.tol, o.max_iter, o.solver_object) if which == "forward" else (o.adjoint_tol, o.adjoint_max_iter, o.adjoint)
        )
        return history_key(which, map_identity(self.f), tuple(z.shape), z.dtype, z.device, tol, budget, solver,
                           o.residual, o.compact, o.stop, torch.is_grad_enabled())

    # -- forward ---------------------------------------------------------------------------
    def solve(self, z0f: Tensor, fz1: Optional[Tensor], tensors: Sequence[Tensor]) -> Tensor:
        """The forward loop from ``z0f`` (``fz1``: f already evaluated there); records stats."""
        opts = self.options

        def call(zw: Tensor, idx: Optional[Tensor]) -> Tensor:
            return self.fn(zw, *self.sliced(tensors, idx))

        block = self._graph_block(z0f, tensors) if opts.cuda_graph else None
        if block is not None:
            zf, stats = iterate_graph(block, z0f, tol=opts.tol, max_iter=opts.max_iter, absolute=opts.absolute,
                                      batch_stop=opts.stop == "batch")
        else:
            zf, stats = iterate(
                call, z0f, solver=opts.solver_object, tol=opts.tol, max_iter=opts.max_iter,
                absolute=opts.absolute, compact=opts.compact, first_fz=fz1, what="fixed_point",
                history=self.history_key("forward", z0f), batch_stop=opts.stop == "batch",
            )
        self.record.stats = stats
        report_failure(stats, opts.on_failure, "forward", opts.tol, opts.max_iter)
        return zf

    def _graph_block(self, z0f: Tensor, tensors: Sequence[Tensor]) -> Optional[GraphBlock]:
        """The captured block of forward iterations, or None (with a warning) if the map
        cannot be captured."""
        damping = float(getattr(self.options.solver_object, "damping", 1.0))
        try:
            return GraphBlock(lambda z: self.fn(z, *tensors), z0f, damping, not self.options.absolute)
        except NotCapturable as err:
            warn_user(
                f"fixed_point: cuda_graph=True, but the map could not be captured in a CUDA graph ({err}); "
                "solving with the eager loop (same results). A capturable map makes no host "
                "synchronisation (.item(), bool(tensor), printing) and creates no CPU tensors",
                UserWarning,
            )
            return None

    def record_graph(self, zs: Tensor, tensors: Sequence[Tensor], needs: Sequence[bool]) -> Graph:
        """One call of f at z* with grad, on detached copies: the graph first-order VJPs use.

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

    # -- backward --------------------------------------------------------------------------
    def backward(
        self,
        g: Tensor,
        zs: Tensor,
        tensors: Sequence[Tensor],
        params: Sequence[Tensor],
        needs: Sequence[bool],
        graph: Graph,
    ) -> List[Optional[Tensor]]:
        """Gradients for ``tensors + params`` (None where not needed): solve u, then (df/dx)^T u."""
        wrt = [i for i, need in enumerate(needs) if need]
        out: List[Optional[Tensor]] = [None] * (len(tensors) + len(params))
        if not wrt:
            return out
        tensors = list(tensors)
        differentiable = torch.is_grad_enabled()

        def vjp_at(u: Tensor, z: Tensor, ts: Sequence[Tensor]) -> Tensor:
            return vjp(self.fn_tuple, [u], [z, *ts], params, wrt=[0])[0]

        if differentiable:
            # Partial derivatives as _VJP nodes: the gradient is differentiable again.
            vjp_z: Callable[[Tensor], Tensor] = lambda u: vjp_at(u, zs, tensors)  # noqa: E731
        else:
            vjp_z = _recorded_vjp(graph)
        opts = self.options
        system = AdjointSystem(
            g=g, vjp=vjp_z, differentiable=differentiable, tol=opts.adjoint_tol,
            max_iter=opts.adjoint_max_iter, residual=opts.residual, compact=opts.compact,
            on_failure=opts.on_failure, z=zs, tensors=tensors,
            vjp_rows=_RowGraphs(self, zs, tensors).vjp, vjp_at=vjp_at,
            history=self.history_key("adjoint", g), batch_stop=opts.stop == "batch",
        )
        u, stats = self.adjoint.solve(system)
        self.record.backward = stats
        grads: List[Optional[Tensor]]
        if differentiable:
            grads = list(vjp(self.fn_tuple, [u], [zs, *tensors], params, wrt=[1 + i for i in wrt], strict=True))
        else:
            y, _, td = graph
            everything = list(td) + list(params)
            targets = [everything[i] for i in wrt]
            if (_ENGINE_RUN is not None and y.requires_grad and type(y) is Tensor and type(u) is Tensor
                    and u.shape == y.shape and u.dtype == y.dtype and all(t.requires_grad for t in targets)):
                # The engine call of torch.autograd.grad, as in _recorded_vjp (no normalisation).
                grads = list(_ENGINE_RUN((y,), (u,), True, False, tuple(targets), True, accumulate_grad=False))
            else:
                grads = _grad([y], targets, [u], create_graph=False)
        for i, gr in zip(wrt, grads):
            out[i] = gr
        return out


_ENGINE_RUN: Optional[Callable[..., Any]] = getattr(torch.autograd.graph, "_engine_run_backward", None)
"""What ``torch.autograd.grad`` calls once its arguments are normalised (None if absent)."""


def _recorded_vjp(graph: Graph) -> Callable[[Tensor], Tensor]:
    """``u -> J^T u`` on the one graph of f recorded at z* in the forward (first order)."""
    y, zd, _ = graph
    outs, wrt_z = (y,), (zd,)
    # Called once per adjoint iteration: the engine call of torch.autograd.grad without its
    # argument normalisation and shape checks (about 15 us a call, a tenth of a small solve's
    # adjoint). Safe here: u is always a plain (B, N) tensor of y's shape, dtype and device.
    run = _ENGINE_RUN if (type(y) is Tensor or type(y) is torch.nn.Parameter) else None

    def vjp_z(u: Tensor) -> Tensor:
        if not y.requires_grad:
            return torch.zeros_like(u)
        if run is not None and type(u) is Tensor and u.shape == y.shape and u.dtype == y.dtype:
            r = run(outs, (u,), True, False, wrt_z, True, accumulate_grad=False)[0]
        else:
            r = torch.autograd.grad(outs, wrt_z, (u,), retain_graph=True, allow_unused=True)[0]
        return torch.zeros_like(u) if r is None else r

    return vjp_z


class _RowGraphs:
    """``J^T u`` on the working rows of a compacted adjoint solve (first order).

    Stopped samples leave the adjoint solve too: once the working rows fall to half the rows of
    the graph in use, f is recorded again on those rows only.
    """

    def __init__(self, problem: Problem, zs: Tensor, tensors: Sequence[Tensor]) -> None:
        self.problem, self.zs, self.tensors = problem, zs, tensors
        self.rows: Optional[Tensor] = None  # rows of the graph in use
        self.graph: Optional[Tuple[Tensor, Tensor]] = None
        self.pos: Optional[Tensor] = None  # position of each working row inside self.rows

    def vjp(self, uw: Tensor, idx: Tensor) -> Tensor:
        p = self.problem
        if self.rows is None or 2 * idx.shape[0] <= self.rows.shape[0]:
            with torch.enable_grad():
                zd = self.zs[idx].detach().requires_grad_(True)
                y = p.fn(zd, *[t.detach() for t in p.sliced(self.tensors, idx)])
            self.rows, self.graph, self.pos = idx, (y, zd), None
        elif self.pos is None or self.pos.shape[0] != idx.shape[0]:
            lookup = torch.full((p.structure.batch,), -1, dtype=torch.long, device=idx.device)
            lookup[self.rows] = torch.arange(self.rows.shape[0], device=idx.device)
            self.pos = lookup[idx]
        y, zd = self.graph  # type: ignore[misc]
        if self.pos is None:
            r = _grad([y], [zd], [uw], create_graph=False)[0]
        else:
            full = uw.new_zeros(y.shape)
            full[self.pos] = uw
            r = _grad([y], [zd], [full], create_graph=False)[0]
            r = None if r is None else r[self.pos]
        return torch.zeros_like(uw) if r is None else r


class _FixedPointFunction(torch.autograd.Function):
    """Forward: solve without a graph. Backward: the adjoint of ``problem.options``.

    Forward mode does not pass through this node: :func:`solve_forward_mode` runs the primal
    solve with forward AD off and attaches the implicit tangent itself, which also reaches
    dual tensors ``f`` captures (a ``jvp`` staticmethod would only see the node's inputs).
    """

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



# -- forward mode and torch.func --------------------------------------------------------------
FUNC_TRANSFORM_MESSAGE = (
    "fixed_point does not support torch.func transforms (vmap, grad, jvp, jacrev, jacfwd, "
    "hessian, functionalize): its forward loop stops each sample on its own, a data-dependent "
    "control flow they cannot trace. It is batched already: pass a batch instead of vmap. For "
    "gradients use loss.backward() or torch.autograd.grad; for Jacobians "
    "torch.autograd.functional.jacobian; for Jacobian-vector products dual tensors of "
    "torch.autograd.forward_ad (implicit forward mode) or torch.autograd.functional.jvp"
)


def check_no_func_transform() -> None:
    """Raise one clear ``NotImplementedError`` inside a ``torch.func`` transform."""
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    if level is not None and level() is not None:
        raise NotImplementedError(FUNC_TRANSFORM_MESSAGE)


def forward_ad_active() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open (dual tensors may exist)."""
    return int(getattr(fwAD, "_current_level", 0)) >= 0


def _primal(t: Any) -> Any:
    return fwAD.unpack_dual(t).primal if isinstance(t, Tensor) else t


def solve_forward_mode(
    solve: Callable[[Callable[..., Any], State, Sequence[Any], Options], Any],
    f: Callable[..., Any],
    z0: State,
    inputs: Sequence[Any],
    options: Options,
) -> Any:
    """``solve`` on the primal values, then the implicit tangent of z* (forward-mode AD).

    Inside a ``dual_level``, with dual tensors among the inputs or captured by ``f`` (e.g.
    module parameters under ``torch.func.functional_call``): the tangent of z* is the solution
    of ``t = (df/dz) t + b`` with ``b = (df/dx) x' + (df/dtheta) theta'``, iterated per sample
    with plain FPI (``t <- tangent of f(dual(z*, t), duals)``, one forward-mode call of ``f``
    per step) to ``backward_tol`` within ``backward_max_iter``. z0's tangent is ignored: z*
    does not depend on z0. Reverse mode is unaffected (the primal solve is the ordinary one).
    """
    z0p = tuple(_primal(p) for p in z0) if isinstance(z0, tuple) else _primal(z0)
    with fwAD._set_fwd_grad_enabled(False):
        sol = solve(f, z0p, [_primal(a) for a in inputs], options)
    structure = _Structure(z0p, options.batched)
    zs = structure.pack(sol.value)
    slots = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
    problem = Problem(f, structure, list(inputs), slots, frozenset(), options, _Record())
    duals = [inputs[i] for i in slots]
    with torch.enable_grad():  # an energy step differentiates f forward-over-reverse
        zreq = zs.detach().requires_grad_(True)

    def tangent_of(t: Optional[Tensor]) -> Optional[Tensor]:
        with torch.enable_grad():
            y = problem.fn(zreq if t is None else fwAD.make_dual(zreq, t), *duals)
        tan = fwAD.unpack_dual(y).tangent
        return None if tan is None else tan.detach()

    b = tangent_of(None)
    if b is None:
        return sol  # no dual reaches f: z* has no tangent

    def tangent_map(t: Tensor, idx: Optional[Tensor]) -> Tensor:
        tan = tangent_of(t)
        return torch.zeros_like(t) if tan is None else tan

    tangent, stats = iterate(
        tangent_map, torch.zeros_like(b), solver=FPI(), tol=options.adjoint_tol,
        max_iter=options.adjoint_max_iter, absolute=options.absolute, first_fz=b,
        what="fixed_point (forward-mode tangent)",
    )
    report_failure(stats, options.on_failure, "tangent (forward mode)", options.adjoint_tol, options.adjoint_max_iter)
    return type(sol)(structure.unpack(fwAD.make_dual(zs, tangent)), sol._record)
