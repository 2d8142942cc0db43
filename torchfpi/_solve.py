"""The public entry point ``fixed_point`` and its module form ``FPILayer``.

``fixed_point`` validates (:class:`~torchfpi._options.Options`), builds the
:class:`~torchfpi._problem.Problem`, runs the forward loop without a graph and attaches the
autograd node whose backward runs the adjoint (:mod:`torchfpi._adjoints`).
"""

from __future__ import annotations

import cmath
import functools
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union, overload

import torch
from torch import Tensor, nn

from torchfpi._adjoints import ADJOINTS, Adjoint
from torchfpi._autograd import _is_float, find_leaves
from torchfpi._graph import check_graph_device
from torchfpi._options import Options
from torchfpi._problem import (
    Problem,
    State,
    _FixedPointFunction,
    _Structure,
    check_no_func_transform,
    forward_ad_active,
    solve_forward_mode,
)
from torchfpi._solution import Solution, _empty_stats, _Record
from torchfpi._solvers import SOLVERS, Solver
from torchfpi.errors import FixedPointError


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


def _sample_slots(options: Options, inputs: Sequence[Any], slots: List[int], batch: int) -> FrozenSet[int]:
    """Positions (in the tensor list) of the per-sample inputs, checked against the batch.

    The rule: ``per_sample=None`` declares every tensor input per-sample; a tuple declares those
    input indices only, and the other inputs are shared. Only declared inputs are ever sliced.
    """
    declared = slots if options.per_sample is None else list(options.per_sample)
    for i in declared:
        if i >= len(inputs) or not isinstance(inputs[i], Tensor):
            got = "missing" if i >= len(inputs) else type(inputs[i]).__name__
            raise ValueError(f"per_sample: input {i} must be a tensor input of f, got {got}")
    if options.compact and options.batched:
        for i in declared:
            t = inputs[i]
            if t.dim() == 0 or t.shape[0] != batch:
                raise ValueError(
                    f"inputs[{i}]: compact=True slices each per-sample input along dim 0 with the "
                    f"state, but it has shape {tuple(t.shape)} and the batch is {batch}; list only the "
                    "inputs with a batch dimension in per_sample=(...) (the others are shared)"
                )
    return frozenset(slots.index(i) for i in declared)


def _version(t: Tensor) -> Optional[int]:
    """The in-place version counter of ``t``; None for inference tensors, which keep none."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """True if ``a`` is ``b`` or a view into ``b``'s storage (empty tensors never count)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _check_first_call(zin: Tensor, zref: Tensor, version: Optional[int], fz: Optional[Tensor],
                      tensors: Sequence[Tuple[int, Tensor]], versions: Sequence[Optional[int]]) -> None:
    """Raise ``ValueError`` if the first call of f wrote into its input or returned a view of it.

    ``zin`` is the private copy of z0 that f received and ``zref`` the caller's values: the
    version counter (or, for inference tensors, a comparison of values) tells whether f
    modified ``zin``; the output's storage whether it is ``zin`` itself or a view of it.
    """
    changed = (_version(zin) != version) if version is not None else not torch.equal(zin, zref)
    if changed:
        raise ValueError(
            "f: the map modified its input z in place (e.g. z.mul_(...), z += ..., out=z); the "
            "solver keeps earlier iterates, so an in-place map gives wrong answers. Compute a new "
            "tensor instead (z * 0.5 rather than z.mul_(0.5))"
        )
    if fz is not None and _same_memory(fz, zin):
        raise ValueError(
            "f: the map returned its input z or a view of it; the solver needs a new tensor for "
            "f(z) (return z.clone() if the map really is the identity)"
        )
    for (i, t), v in zip(tensors, versions):
        if v is not None and _version(t) != v:
            raise ValueError(
                f"f: the map modified inputs[{i}] in place; a fixed-point map must not change its "
                "inputs (the caller's tensor is now changed too)"
            )


def _solve_empty(f: Callable[..., Any], z0: State, inputs: Sequence[Any], structure: _Structure) -> Solution[Any]:
    """An empty batch (B = 0): one call of f validates its output; no iteration runs."""
    zin = tuple(p.clone() for p in z0) if isinstance(z0, tuple) else z0.clone()  # type: ignore[union-attr]
    out = f(zin, *inputs)
    structure.check_output(out, 0)
    record = _Record()
    record.stats = _empty_stats(0, structure.device, structure.dtype)
    return Solution(out, record)


def solve_with_options(f: Callable[..., Any], z0: State, inputs: Sequence[Any], options: Options) -> Solution[Any]:
    """:func:`fixed_point` with validated options (what the layers call)."""
    if not callable(f):
        raise TypeError(f"f: expected a callable (function or nn.Module), got {type(f).__name__}")
    check_no_func_transform()
    if forward_ad_active():  # dual tensors: the implicit tangent (forward-mode AD)
        return solve_forward_mode(_solve_primal, f, z0, inputs, options)
    return _solve_primal(f, z0, inputs, options)


def _in_dtype(f: Callable[..., Any], compute: torch.dtype, state: torch.dtype) -> Callable[..., Any]:
    """``f`` called on the state cast to ``compute``, its floating outputs cast back to ``state``."""

    def cast(x: Any, dtype: torch.dtype) -> Any:
        if isinstance(x, tuple):
            return tuple(cast(p, dtype) for p in x)
        return x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() else x

    def mapped(z: Any, *inputs: Any) -> Any:
        return cast(f(cast(z, compute), *inputs), state)

    return mapped


def _solve_primal(f: Callable[..., Any], z0: State, inputs: Sequence[Any], options: Options) -> Solution[Any]:
    structure = _Structure(z0, options.batched)
    if options.compute_dtype is not None and options.compute_dtype != structure.dtype:
        f = _in_dtype(f, options.compute_dtype, structure.dtype)
    if structure.batch == 0:
        return _solve_empty(f, z0, inputs, structure)
    z0f = structure.pack(z0).detach()
    if options.cuda_graph:
        check_graph_device(z0f)
    slots = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
    tensors = [inputs[i] for i in slots]
    _check_finite(z0f, [(i, inputs[i]) for i in slots if _is_float(inputs[i])])
    sample_slots = _sample_slots(options, inputs, slots, structure.batch)
    record = _Record()
    problem = Problem(f, structure, list(inputs), slots, sample_slots, options, record)
    grad_on = torch.is_grad_enabled()
    named = list(zip(slots, tensors))
    versions = [_version(t) for t in tensors]
    if grad_on and getattr(options.adjoint, "records_forward", False):
        zin = z0f.clone()  # f never sees the caller's z0, whatever it does to its input
        version = _version(zin)
        zf = problem.solve(zin, None, tensors)  # recorded: autograd unrolls the iterations
        _check_first_call(zin, z0f, version, None, named, versions)
        return Solution(structure.unpack(zf), record)
    # The first call of f validates its output and, with grad on, reveals the tensors f uses
    # through its closure (parameters, captured tensors): they become inputs of the node.
    # z enters that call as a fresh copy of z0, with grad on a leaf requiring grad, so that an
    # f which differentiates w.r.t. z (an energy step) does not create leaves of its own that
    # would look like parameters. The copy also keeps the caller's z0 safe from a map that
    # writes into its input, which this first call detects (version counter, output storage;
    # with grad on, torch's own refusal).
    detached = [t.detach() for t in tensors]
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False):  # an ordinary tensor keeps a version counter
            zin = z0f.clone()
    else:
        zin = z0f.clone()
    if grad_on:
        # A leaf, not a clone of one: torch.compile'd maps guard on their inputs' .grad,
        # which warns for a non-leaf. Torch itself refuses in-place writes into it.
        zin.requires_grad_(True)
    version = _version(zin)
    try:
        fz1 = problem.fn(zin, *detached)
    except RuntimeError as err:
        # With grad on, torch refuses in-place writes into z (a leaf requiring grad) or into
        # the views a tuple state is split into. Say what it means for a fixed-point map.
        text = str(err)
        if "is a view and is being modified inplace" in text:
            what = "its input z in place (a part of the tuple state)"
        elif "leaf Variable that requires grad is being used in an in-place operation" in text:
            what = "its input z, or another tensor that requires grad, in place"
        else:
            raise
        raise ValueError(
            f"f: the map modified {what}; a fixed-point map must compute new tensors "
            "(z * 0.5 rather than z.mul_(0.5))"
        ) from err
    _check_first_call(zin, z0f, version, fz1, named, versions)
    params = find_leaves([fz1], exclude=[zin]) if grad_on else []
    fz1 = fz1.detach()
    zstart = zin.detach()
    if grad_on and (bool(params) or any(t.requires_grad for t in tensors)):
        zf = _FixedPointFunction.apply(problem, zstart, fz1, *tensors, *params)
    else:
        with torch.no_grad():
            zf = problem.solve(zstart, fz1, detached)
    return Solution(structure.unpack(zf), record)


@overload
def fixed_point(
    f: Callable[..., Any], z0: Tensor, *inputs: Any, solver: Union[str, Solver] = ...,
    backward: Union[str, Adjoint] = ..., tol: float = ..., max_iter: int = ...,
    backward_tol: Optional[float] = ..., backward_max_iter: Optional[int] = ..., on_failure: str = ...,
    residual: str = ..., compact: bool = ..., batched: bool = ..., per_sample: Optional[Sequence[int]] = ...,
    compute_dtype: Optional[torch.dtype] = ..., cuda_graph: bool = ..., stop: str = ...,
) -> Solution[Tensor]: ...


@overload
def fixed_point(
    f: Callable[..., Any], z0: Tuple[Tensor, ...], *inputs: Any, solver: Union[str, Solver] = ...,
    backward: Union[str, Adjoint] = ..., tol: float = ..., max_iter: int = ...,
    backward_tol: Optional[float] = ..., backward_max_iter: Optional[int] = ..., on_failure: str = ...,
    residual: str = ..., compact: bool = ..., batched: bool = ..., per_sample: Optional[Sequence[int]] = ...,
    compute_dtype: Optional[torch.dtype] = ..., cuda_graph: bool = ..., stop: str = ...,
) -> Solution[Tuple[Tensor, ...]]: ...


def fixed_point(
    f: Callable[..., Any],
    z0: State,
    *inputs: Any,
    solver: Union[str, Solver] = "fpi",
    backward: Union[str, Adjoint] = "fpi",
    tol: float = 1e-6,
    max_iter: int = 100,
    backward_tol: Optional[float] = None,
    backward_max_iter: Optional[int] = None,
    on_failure: str = "warn",
    residual: str = "relative",
    compact: bool = False,
    batched: bool = True,
    per_sample: Optional[Sequence[int]] = None,
    compute_dtype: Optional[torch.dtype] = None,
    cuda_graph: bool = False,
    stop: str = "sample",
) -> Solution[Any]:
    r"""Solve z* = f(z*, \*inputs) by iteration, differentiably: the forward FPI layer.

    The forward solve iterates ``z <- f(z, *inputs)`` (or an accelerated variant) without
    recording a graph, so memory does not grow with the iteration count. Each sample (dim 0 of
    the state) stops on its own when its residual (:func:`torchfpi.relative_residual`,
    ``||f(z) - z|| / max(||f(z)||, 1e-9 s)`` with ``s = max(||z0||, ||f(z0)||)`` per sample)
    falls below ``tol`` while ``||f(z) - z||`` still shrinks (a drifting map never converges),
    and is then frozen: its result does not depend on the rest of the batch. A sample that does
    not converge returns its best image by ``||f(z) - z||``.
    Gradients come from the backward FPI layer: ``u = g + (df/dz)^T u`` solved with
    vector-Jacobian products, then ``dL/dx = (df/dx)^T u`` for every input and every tensor ``f``
    uses (``nn.Module`` parameters and captured tensors alike). The backward is itself
    differentiable: a second derivative solves another backward fixed point.
    Forward mode: inside ``torch.autograd.forward_ad.dual_level()``, dual tensors among the
    inputs or captured by ``f`` give ``value`` the implicit tangent ``t = (df/dz) t + (df/dx) x'``
    (FPI on Jacobian-vector products to ``backward_tol``); ``torch.func`` transforms raise a
    ``NotImplementedError`` naming what to use instead.

    Args:
        f: the map, ``f(z, *inputs) -> z_like``; a function or an ``nn.Module``. It may call
            ``torch.autograd.grad`` (e.g. an energy gradient step), and must be deterministic.
            It must return a new tensor and leave its arguments alone: a map that writes into
            ``z`` or an input (``z.mul_(0.5)``, ``z += x``) or returns ``z`` itself or a view of
            it is refused with a ``ValueError`` on its first call (version counters and storage
            are compared; inputs created under ``torch.inference_mode()`` keep no version
            counter and are not checked). ``f`` never receives the caller's ``z0`` itself, so
            ``z0`` is never modified.
        z0: initial iterate, ``(B, *S)`` floating tensor or a tuple of such tensors (then ``f``
            takes and returns a tuple). ``z0`` receives no gradient: the fixed point does not
            depend on it. An empty batch (``B = 0``) calls ``f`` once (to check its output) and
            returns an empty :class:`Solution` (status, iterations ``(0,)``; trace ``(0, 0)``).
        *inputs: further arguments of ``f``; floating tensors among them receive gradients.
        solver: ``"fpi"``, ``"anderson"``, ``"broyden"`` or a solver object (:class:`FPI`,
            :class:`Anderson`, :class:`Broyden`).
        backward: ``"fpi"`` (default, exact), ``"anderson"`` (exact), ``"neumann"``, ``"onestep"``
            (inexact), ``"unroll"``, ``"dense"`` (references), a name given to
            :func:`register_adjoint`, or an adjoint object (:class:`ImplicitAdjoint`, ...).
        tol: residual tolerance, a finite number > 0 (and < 1 for the relative residual),
            relative unless ``residual="absolute"``.
        max_iter: iteration budget (calls of ``f``) per sample, an integer >= 1 (``int`` or a
            numpy integer; ``bool`` and floats are a ``TypeError``).
        backward_tol: tolerance of the adjoint solve (and of second-order adjoints); ``None``
            means ``tol``. Ignored by modes without an iterative solve.
        backward_max_iter: budget of the adjoint solve; ``None`` means ``max_iter``.
        on_failure: what a sample that did not converge or diverged triggers, forward or
            backward: ``"warn"`` (:class:`ConvergenceWarning`), ``"raise"``
            (:class:`FixedPointError`) or ``"ignore"``. NaN/Inf always raise.
        residual: ``"relative"`` or ``"absolute"`` (``||f(z) - z||``).
        compact: drop stopped samples from the batch ``f`` sees. Only valid if ``f`` treats
            samples independently. The per-sample inputs are sliced along; the others are
            shared and passed whole (see ``per_sample``).
        batched: ``False`` if ``z0`` has no batch dimension (it is then treated as one sample).
        per_sample: indices (into ``inputs``) of the inputs whose dim 0 is the batch. ``None``
            (default) declares every tensor input per-sample. With ``compact=True`` only these
            are sliced, and each must have the batch as dim 0 (else ``ValueError``); pass shared
            tensors (weights) either through ``f``'s closure / module parameters or as inputs
            left out of ``per_sample``, e.g. ``fixed_point(f, z0, x, W, per_sample=(0,))``.
        compute_dtype: mixed precision. ``None`` (default): ``f`` sees the state as it is. A
            floating ``torch.dtype`` (e.g. ``torch.bfloat16``): before each call of ``f`` the
            state ``z`` (each part of a tuple state) is cast to this dtype, and ``f``'s output
            is cast back to ``z0``'s dtype; so the iterates, the residuals, the solver's history
            and the adjoint (whose vector-Jacobian products flow back through both casts) stay
            in ``z0``'s dtype (e.g. float32) while ``f`` itself computes in low precision. Only
            ``z`` is cast: ``inputs``, parameters and captured tensors reach ``f`` unchanged, so
            ``f`` must compute in this dtype itself (a bf16 module, or ``torch.autocast`` inside
            ``f``), and may return any floating dtype. Expect residuals and gradients no
            better than the dtype's precision: choose ``tol`` accordingly (about ``1e-2`` for
            bfloat16, ``1e-3`` for float16).
        cuda_graph: capture blocks of forward iterations in a CUDA graph and replay them (one
            launch and one host read per block; see ``docs/concepts.md``). Needs a CUDA state,
            ``solver="fpi"`` (or ``torchfpi.FPI``), ``compact=False`` and an implicit backward
            (``ValueError`` otherwise); a map that cannot be captured (it synchronises with the
            host, e.g. ``.item()``) gives a ``UserWarning`` and the eager loop, with the same
            results. The backward is not captured. Unmeasured on a GPU so far.
        stop: ``"sample"`` (default): each sample stops at the iteration where it converges
            and keeps that result, whatever the rest of the batch does. ``"batch"``: the batch
            runs until its last sample converges, and every converged sample returns the
            image of that iteration (what a plain loop with a batch-wide stop returns), forward
            and backward; ``compact`` must be False. Samples still stop being tested once they
            converged, and diverged ones keep their own results. Slightly cheaper (no per-sample
            gather); a sample's result then depends on the rest of the batch.

    Returns:
        A :class:`Solution`: ``value`` (z*, like ``z0``), ``iterations``, ``residual``,
        ``converged``, ``status`` (each ``(B,)``), ``trace`` ``(T, B)``, ``backward`` stats.

    Warns:
        ConvergenceWarning: with ``on_failure="warn"``, attributed to the caller's line (of
            ``fixed_point``, of the layer call, or of ``.backward()`` / ``torch.autograd.grad``
            for the backward solve), not to torchfpi's or torch's internals.

    Raises:
        TypeError: ``z0`` not a floating tensor (or tuple of them); unknown keyword arguments;
            an option of the wrong type.
        ValueError: an invalid option value, a per-sample input without the batch as dim 0
            under ``compact``, ``f`` returning another shape, dtype or device, or ``f``
            modifying its arguments in place or returning a view of ``z``.
        FixedPointError: NaN/Inf in ``z0``, the inputs or ``f``'s output (naming the
            iteration), or non-convergence / divergence with ``on_failure="raise"``.
        NotImplementedError: called inside a ``torch.func`` transform (vmap, grad, jvp, ...).

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
    keywords = dict(
        solver=solver, backward=backward, tol=tol, max_iter=max_iter, backward_tol=backward_tol,
        backward_max_iter=backward_max_iter, on_failure=on_failure, residual=residual,
        compact=compact, batched=batched, per_sample=per_sample,
        compute_dtype=compute_dtype, cuda_graph=cuda_graph, stop=stop,
    )
    return solve_with_options(f, z0, inputs, _options(keywords))


def _options(keywords: Dict[str, Any]) -> Options:
    """``Options(**keywords)``, validated once per distinct set of keyword values (Options is
    frozen, so one object serves every call): a repeated solve skips the validation."""
    key: Tuple[Any, ...] = tuple((name, type(value), value) for name, value in keywords.items())
    # Names resolve through registries that may change: the current factories join the key.
    key += (SOLVERS.get(keywords["solver"]) if isinstance(keywords["solver"], str) else None,
            ADJOINTS.get(keywords["backward"]) if isinstance(keywords["backward"], str) else None)
    try:
        hash(key)
    except TypeError:  # an unhashable value (a list of per-sample indices): validate each time
        return Options(**keywords)
    return _cached_options(key)


@functools.lru_cache(maxsize=64)
def _cached_options(key: Tuple[Any, ...]) -> Options:
    return Options(**{name: value for name, _, value in key[:-2]})


class FPILayer(nn.Module):
    r"""``nn.Module`` form of :func:`fixed_point`: ``forward(*inputs, z0=None) -> z*``.

    ``f`` is registered as a sub-module when it is one, so its parameters belong to the layer.
    The latest :class:`Solution` is kept in ``last_solution`` for inspection.

    Args:
        f: the map ``f(z, *inputs)``.
        init: optional ``init(*inputs) -> z0`` used when ``forward`` gets no ``z0``.
        options: an :class:`Options` to start from (default: ``Options()``).
        **keywords: the keyword options of :func:`fixed_point` (``solver``, ``backward``,
            ``tol``, ``max_iter``, ``backward_tol``, ``backward_max_iter``, ``on_failure``,
            ``residual``, ``compact``, ``batched``, ``per_sample``, ``compute_dtype``, ``cuda_graph``, ``stop``), validated now; an unknown
            keyword is a ``TypeError``. The result is the frozen ``self.options``.

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
        options: Optional[Options] = None,
        **keywords: Any,
    ) -> None:
        super().__init__()
        if not callable(f):
            raise TypeError(f"f: expected a callable (function or nn.Module), got {type(f).__name__}")
        self.f = f
        self.init = init
        self.options = Options.build(options, keywords, type(self).__name__)
        self.last_solution: Optional[Solution[Any]] = None

    def solve(self, *inputs: Any, z0: Optional[State] = None) -> Solution[Any]:
        """Run the solve and return the full :class:`Solution` (also kept in ``last_solution``)."""
        sol = solve_with_options(self.map, self.initial_state(inputs, z0), inputs, self.options)
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

    def forward(self, *inputs: Any, z0: Optional[State] = None) -> Tensor:  # noqa: D401
        """z* for these inputs (starting from ``z0`` or ``init(*inputs)``); a tuple state gives a tuple."""
        return self.solve(*inputs, z0=z0).value
