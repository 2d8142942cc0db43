"""Differentiable partial derivatives of energies: grad_z E as a node of the graph."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


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

    Raises:
        ValueError: if the energy does not return shape ``(B,)``.

    Example:
        >>> import torch, torchfpi
        >>> z = torch.tensor([[1.0, -2.0]])
        >>> torchfpi.energy_grad(lambda z: 0.5 * (z ** 2).sum(1), z).tolist()
        [[1.0, -2.0]]
    """
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        zz = z if z.requires_grad else z.detach().requires_grad_(True)
        e = energy(zz, *inputs)
        if not isinstance(e, Tensor) or tuple(e.shape) != (z.shape[0],):
            got = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
            raise ValueError(
                f"energy must return one value per sample, shape ({z.shape[0]},); got {got}"
            )
        (g,) = torch.autograd.grad(e.sum(), zz, create_graph=create, allow_unused=True)
    if g is None:
        g = torch.zeros_like(z)
    return g
