"""The three learned denoisers: FPI_GD on an FoE energy, the same energy unrolled, and FPI_NN.

All take a noisy image ``y`` of shape ``(B, 1, H, W)`` on the [0, 1] scale and return the estimate
of the same shape. ``last_info`` holds the statistics of the last solve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchfpi
from torchfpi.apps.denoise.energy import FoEEnergy


@dataclass
class SolveInfo:
    """Per-call statistics: mean forward iterations and final relative residual (batch means).

    ``solution`` is the :class:`torchfpi.Solution` of the solve: after a backward pass,
    ``solution.backward`` holds the backward solve's statistics.
    """

    iterations: float
    residual: float
    solution: Optional[Any] = None

    def backward_iterations(self) -> float:
        """Mean iterations of the latest backward solve (NaN if none ran or unknown)."""
        sol = self.solution
        if sol is None or sol.backward is None:
            return float("nan")
        return float(sol.backward.iterations.float().mean())


def solve(f: Callable[..., Tensor], z0: Tensor, *inputs: Tensor, tol: float, max_iter: int) -> Tuple[Tensor, SolveInfo]:
    """``z* = f(z*, *inputs)`` by :func:`torchfpi.fixed_point` with the implicit gradient.

    Forward and backward are both Anderson-accelerated: the backward fixed point
    ``u = g + (I - a H)^T u`` of a gradient step contracts only as fast as plain gradient descent
    (``1 - a mu``), which for a sharp learned energy needs hundreds of plain iterations. Failures
    are reported in ``SolveInfo`` (the trainer rejects an update from an unconverged solve).
    """
    sol = torchfpi.fixed_point(f, z0, *inputs, solver="anderson", backward="anderson", tol=tol, max_iter=max_iter,
                               backward_tol=tol, backward_max_iter=2 * max_iter, on_failure="ignore")
    value = sol.value
    if not isinstance(value, Tensor):  # pragma: no cover - a tensor z0 gives a tensor value
        raise TypeError("expected a tensor fixed point")
    return value, SolveInfo(float(sol.iterations.float().mean()), float(sol.residual.mean()), sol)


def _pad(y: Tensor, p: int) -> Tensor:
    """Reflection padding by ``p`` pixels, in steps when ``p`` reaches the image side (a coarse bank's
    padding can exceed a small image)."""
    while p > 0:
        q = min(p, y.shape[-1] - 1, y.shape[-2] - 1)
        y = F.pad(y, (q, q, q, q), mode="reflect")
        p -= q
    return y


def _crop(z: Tensor, p: int) -> Tensor:
    return z[..., p:-p, p:-p] if p > 0 else z


class FPIGDDenoiser(nn.Module):
    """FPI_GD: ``z* = z* - a grad_z E(z*, y)``, the minimiser of the FoE energy (implicit gradient).

    The image is padded by reflection by ``kernel_size // 2`` pixels, the energy is minimised on
    the padded domain (valid correlations, so the gradient is exact) and the border is cropped.
    The step ``a = step_fraction / L`` uses the curvature bound ``L`` of
    :meth:`FoEEnergy.lipschitz_bound`; it changes the speed, not the fixed point, so it is not a
    trained parameter.
    """

    kind = "fpi_gd"

    def __init__(self, energy: Optional[FoEEnergy] = None, step_fraction: float = 1.0,
                 tol: float = 1e-3, max_iter: int = 100, path: str = "analytic") -> None:
        super().__init__()
        if path not in ("analytic", "layer"):
            raise ValueError(f"path: expected 'analytic' or 'layer', got '{path}'")
        self.path = path
        self.energy = energy if energy is not None else FoEEnergy()
        self.step_fraction = float(step_fraction)
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.last_info = SolveInfo(0.0, 0.0)

    def step_size(self) -> float:
        return self.step_fraction / self.energy.lipschitz_bound()

    def update(self, z: Tensor, y: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """One gradient step ``f(z, y) = z - a grad_z E(z, y)``.

        With grad enabled (the graph the implicit backward differentiates) the gradient is
        :meth:`FoEEnergy.grad_split`: the backward's vector-Jacobian products in ``z`` are then
        analytic Hessian-vector products instead of autograd through the gradient's graph.
        ``weight``: an adaptive data weight map computed once per solve and passed to it as an
        input, so its parameters get their gradient through the implicit backward.
        """
        return z - self._a * self.energy.grad_split(z, y, weight)

    def forward(self, y: Tensor, tol: Optional[float] = None, max_iter: Optional[int] = None) -> Tensor:
        p = self.energy.pad
        yp = _pad(y, p)
        self._a = self.step_size()
        tol = self.tol if tol is None else tol
        max_iter = self.max_iter if max_iter is None else max_iter
        if self.path == "layer":
            layer = torchfpi.FPIGD(self.energy, step_size=self._a, init=lambda y: y.detach().clone(),
                                   solver="anderson", tol=tol, max_iter=max_iter,
                                   backward_tol=tol, backward_max_iter=max_iter, on_failure="ignore")
            z = layer(yp)
            sol = layer.last_solution
            if sol is None:  # pragma: no cover - a layer call always records its solution
                raise RuntimeError("FPIGD did not record its solution")
            info = SolveInfo(float(sol.iterations.float().mean()), float(sol.residual.mean()), sol)
        else:
            # an adaptive data weight map is computed once per solve and enters as an input
            extra = (self.energy.data_weight(yp),) if self.energy.data_net is not None else ()
            z, info = solve(self.update, yp.detach().clone(), yp, *extra, tol=tol, max_iter=max_iter)
        self.last_info = info
        return _crop(z, p)


class UnrolledDenoiser(nn.Module):
    """TNRD-style baseline: ``T`` gradient steps on the same energy from ``z_0 = y``, backprop through all.

    The step ``a = exp(log_step)`` is learned (the iterate is not a minimiser, so it matters).
    """

    kind = "unrolled"

    def __init__(self, energy: Optional[FoEEnergy] = None, steps: int = 10) -> None:
        super().__init__()
        self.energy = energy if energy is not None else FoEEnergy()
        self.steps = int(steps)
        self.log_step = nn.Parameter(torch.tensor(math.log(1.0 / self.energy.lipschitz_bound())))
        self.last_info = SolveInfo(float(self.steps), 0.0)

    def forward(self, y: Tensor, tol: Optional[float] = None, max_iter: Optional[int] = None) -> Tensor:
        p = self.energy.pad
        yp = _pad(y, p)
        z = yp
        a = self.log_step.exp()
        weight = self.energy.data_weight(yp)  # once for the T steps (the adaptive map is a CNN)
        for _ in range(self.steps):
            z = z - a * self.energy.grad(z, yp, weight)
        self.last_info = SolveInfo(float(self.steps), 0.0)
        return _crop(z, p)


class ConvUpdate(nn.Module):
    """FPI_NN update for images: ``f(z, y) = y - R([z, y])`` with a small residual CNN ``R``.

    ``R``: conv3x3(2->C), ReLU, (conv3x3(C->C), ReLU) x (depth-2), conv3x3(C->1), with
    spectral normalisation on the hidden convolutions so that the map stays contractive in z.
    """

    def __init__(self, channels: int = 24, depth: int = 3) -> None:
        super().__init__()
        layers: list = [nn.Conv2d(2, channels, 3, padding=1, padding_mode="reflect"), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.utils.parametrizations.spectral_norm(
                nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")), nn.ReLU()]
        last = nn.Conv2d(channels, 1, 3, padding=1, padding_mode="reflect", bias=True)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)  # type: ignore[arg-type]  # bias=True: a tensor
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        return y - 0.5 * self.net(torch.cat([z, y], dim=1))


class FPINNDenoiser(nn.Module):
    """FPI_NN (deep-equilibrium denoiser): ``z* = y - R([z*, y])`` solved by Anderson, implicit gradient."""

    kind = "fpi_nn"

    def __init__(self, channels: int = 24, depth: int = 3, tol: float = 1e-3, max_iter: int = 50) -> None:
        super().__init__()
        self.update = ConvUpdate(channels, depth)
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.last_info = SolveInfo(0.0, 0.0)

    def forward(self, y: Tensor, tol: Optional[float] = None, max_iter: Optional[int] = None) -> Tensor:
        z, info = solve(self.update, y.detach().clone(), y,
                        tol=self.tol if tol is None else tol,
                        max_iter=self.max_iter if max_iter is None else max_iter)
        self.last_info = info
        return z


MODELS = {"fpi_gd": FPIGDDenoiser, "unrolled": UnrolledDenoiser, "fpi_nn": FPINNDenoiser}


#: Any of the three denoisers (each has ``last_info``; the energy models have ``energy``).
Denoiser = Union["FPIGDDenoiser", "UnrolledDenoiser", "FPINNDenoiser"]


def build_model(kind: str, config: Dict[str, Any]) -> Any:
    """Build a denoiser from its kind and a JSON-able configuration (as stored in checkpoints)."""
    if kind not in MODELS:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got '{kind}'")
    cfg = dict(config)
    if kind in ("fpi_gd", "unrolled"):
        energy = FoEEnergy(**cfg.pop("energy", {}))
        return MODELS[kind](energy, **cfg)
    return MODELS[kind](**cfg)
