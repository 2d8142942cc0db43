"""Partial derivatives as graph nodes: a differentiable VJP node, ``energy_grad``, leaf discovery.

``_VJP`` computes partial derivatives of a function at a point *on detached copies* of its
explicit arguments, then re-attaches the result to the graph as a node of its own. Its backward
is again a ``_VJP`` (of the VJP function), so it is differentiable to any order. This is what
lets the backward of a fixed-point layer be differentiated without autograd following the
layer's own output back into the layer: differentiating f(z*) w.r.t. theta with z* the layer's own
connected output would make autograd recurse into the same backward without end.

Implicit arguments are leaf tensors that the function uses through its closure (parameters of
an ``nn.Module``, captured tensors): they are used as they are (they have no history to follow)
and receive gradients through this node.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from torchfpi.errors import FixedPointError


def _is_float(t: object) -> bool:
    return isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())


def find_leaves(outputs: Sequence[Tensor], exclude: Sequence[Tensor] = ()) -> List[Tensor]:
    """Leaf tensors requiring grad that the graph of ``outputs`` reaches, minus ``exclude``.

    These are the parameters and captured tensors a function used. The walk follows
    ``grad_fn.next_functions`` once per node.
    """
    excluded = {id(t) for t in exclude}
    seen_nodes = set()
    leaves: List[Tensor] = []
    seen_leaves = set()
    stack = [o.grad_fn for o in outputs if isinstance(o, Tensor) and o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        var = getattr(node, "variable", None)
        if var is not None:  # AccumulateGrad: a leaf
            if id(var) not in excluded and id(var) not in seen_leaves:
                seen_leaves.add(id(var))
                leaves.append(var)
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None:
                stack.append(nxt)
    return leaves


def _grad(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    cotangents: Sequence[Tensor],
    create_graph: bool,
) -> List[Optional[Tensor]]:
    """``torch.autograd.grad`` that tolerates outputs without graph and unused inputs."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not pairs or not inputs:
        return [None] * len(inputs)
    outs, cots = zip(*pairs)
    return list(
        torch.autograd.grad(
            outs, inputs, cots, retain_graph=True, create_graph=create_graph, allow_unused=True
        )
    )


class _VJP(torch.autograd.Function):
    """``(c, p) -> [d<fn(p), c>/dp_i for i in wrt]``, differentiable to any order.

    ``apply(fn, n_cot, n_explicit, wrt, *tensors)`` with ``tensors = cotangents + explicit +
    implicit``; ``fn(*explicit)`` returns a tuple of ``n_cot`` tensors and may use the implicit
    leaves through its closure; ``wrt`` indexes ``explicit + implicit``.
    """

    @staticmethod
    def forward(ctx, fn, n_cot, n_explicit, wrt, strict, *tensors):  # type: ignore[override]
        cots = tensors[:n_cot]
        primals = tensors[n_cot:]
        explicit = primals[:n_explicit]
        implicit = primals[n_explicit:]
        with torch.enable_grad():
            copies = [
                p.detach().requires_grad_(True) if _is_float(p) else p for p in explicit
            ]
            outs = fn(*copies)
            everything = list(copies) + list(implicit)
            targets = [everything[i] for i in wrt]
            grads = _grad(outs, targets, cots, create_graph=False)
        if strict:
            for i, g in zip(wrt, grads):
                if g is None and i >= n_explicit:
                    raise FixedPointError(
                        "f no longer uses a tensor it used during the forward solve (shape "
                        f"{tuple(everything[i].shape)}): its parameters were replaced between forward "
                        "and backward (e.g. by torch.func.functional_call, or reassigned). Pass such "
                        "tensors to fixed_point as explicit inputs instead"
                    )
        result = tuple(
            torch.zeros_like(t) if g is None else g.detach() for g, t in zip(grads, targets)
        )
        ctx.fn = fn
        ctx.n_cot = n_cot
        ctx.n_explicit = n_explicit
        ctx.wrt = wrt
        ctx.save_for_backward(*tensors)
        return result

    @staticmethod
    def backward(ctx, *grad_outputs):  # type: ignore[override]
        tensors = ctx.saved_tensors
        fn, n_cot, n_explicit, wrt = ctx.fn, ctx.n_cot, ctx.n_explicit, ctx.wrt
        implicit = tensors[n_cot + n_explicit :]

        def vjp_fn(*xs):
            cots_, explicit_ = xs[:n_cot], xs[n_cot:]
            outs = fn(*explicit_)
            everything = list(explicit_) + list(implicit)
            targets = [everything[i] for i in wrt]
            grads = _grad(outs, targets, cots_, create_graph=True)
            return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, targets))

        needs = ctx.needs_input_grad[5:]
        wrt2 = tuple(i for i in range(len(tensors)) if needs[i])
        if not wrt2:
            return (None, None, None, None, None) + (None,) * len(tensors)
        res = _VJP.apply(vjp_fn, len(grad_outputs), n_cot + n_explicit, wrt2, False, *grad_outputs, *tensors)
        out: List[Optional[Tensor]] = [None] * len(tensors)
        for i, g in zip(wrt2, res):
            out[i] = g
        return (None, None, None, None, None, *out)


def vjp(
    fn: Callable[..., Tuple[Tensor, ...]],
    cotangents: Sequence[Tensor],
    explicit: Sequence[object],
    implicit: Sequence[Tensor],
    wrt: Sequence[int],
    strict: bool = False,
) -> Tuple[Tensor, ...]:
    """Differentiable VJP of ``fn`` at ``explicit`` (see :class:`_VJP`).

    With ``strict``, an implicit leaf that ``fn`` no longer reaches raises instead of getting a
    silent zero gradient.
    """
    return _VJP.apply(fn, len(cotangents), len(explicit), tuple(wrt), strict, *cotangents, *explicit, *implicit)


def energy_grad(energy: Callable[..., Tensor], z: Tensor, *inputs: Any) -> Tensor:
    r"""grad_z E(z, \*inputs), a node of the autograd graph, itself differentiable.

    With grad mode on, the gradient is built with ``create_graph=True``, so it can be
    differentiated again w.r.t. ``z``, the inputs and the energy's parameters (Hessian-vector
    products are exact, never finite differences). Under ``torch.no_grad()`` it returns a plain
    tensor and keeps no graph, so a forward fixed-point loop stays memory-free. This is the
    partial-derivative operator FPI_GD is built from.

    Args:
        energy: ``energy(z, *inputs) -> (B,)``, one energy per sample.
        z: ``(B, *S)`` point.

    Returns:
        ``(B, *S)`` gradient of the summed energy (equal to each sample's own gradient when the
        energy treats samples independently).

    Under ``torch.inference_mode()`` it works too: inference mode is left locally (inference
    tensors among ``z`` and ``inputs`` are copied into ordinary ones) and a plain tensor comes
    back.

    Raises:
        ValueError: if the energy does not return shape ``(B,)``, or ``z`` is 0-dim.
        TypeError: if ``z`` is not a floating-point tensor.

    Example:
        >>> import torch, torchfpi
        >>> z = torch.tensor([[1.0, -2.0]])
        >>> torchfpi.energy_grad(lambda z: 0.5 * (z ** 2).sum(1), z).tolist()
        [[1.0, -2.0]]
    """
    return energy_and_grad(energy, z, inputs)[1]


def energy_and_grad(energy: Callable[..., Tensor], z: Tensor, inputs: Sequence[Any]) -> Tuple[Tensor, Tensor]:
    """``(E(z, *inputs), grad_z E)``: :func:`energy_grad`, also returning the energies.

    Under ``torch.inference_mode()`` autograd cannot record, so inference mode is left locally
    and inference tensors among ``z`` and ``inputs`` are replaced by ordinary copies; the
    results are plain tensors. (Tensors the energy captures itself must not be inference
    tensors: autograd cannot save them.)
    """
    if not callable(energy):
        raise TypeError(f"energy: expected a callable energy(z, *inputs) -> (B,), got {type(energy).__name__}")
    if not isinstance(z, Tensor) or not z.is_floating_point():
        got = f"dtype {z.dtype}" if isinstance(z, Tensor) else type(z).__name__
        raise TypeError(f"z: energy_grad expects a floating-point tensor of shape (B, *S), got {got}")
    if z.dim() == 0:
        raise ValueError("z: energy_grad expects shape (B, *S) with the batch as dim 0, got a 0-dim tensor")
    if torch.is_inference_mode_enabled() or z.is_inference():
        with torch.inference_mode(False):
            zc = z.clone() if z.is_inference() else z.detach()
            args = [a.clone() if isinstance(a, Tensor) and a.is_inference() else a for a in inputs]
            e, g = _energy_and_grad(energy, zc, args, create=False)
        return e.detach(), g.detach()
    return _energy_and_grad(energy, z, inputs, create=torch.is_grad_enabled())


def _energy_and_grad(
    energy: Callable[..., Tensor], z: Tensor, inputs: Sequence[Any], create: bool
) -> Tuple[Tensor, Tensor]:
    with torch.enable_grad():
        zz = z if z.requires_grad else z.detach().requires_grad_(True)
        e = energy(zz, *inputs)
        if not isinstance(e, Tensor) or tuple(e.shape) != (z.shape[0],):
            got = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
            raise ValueError(
                f"energy must return one value per sample, shape ({z.shape[0]},); got {got}"
            )
        if not e.requires_grad:
            return e, torch.zeros_like(z)
        (g,) = torch.autograd.grad(e.sum(), zz, create_graph=create, allow_unused=True)
    if g is None:
        g = torch.zeros_like(z)
    return e, g
