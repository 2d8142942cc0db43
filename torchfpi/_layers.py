"""The paper's two practical layers: FPI_NN (a network update) and FPI_GD (an energy's GD step)."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchfpi._autograd import energy_and_grad, energy_grad
from torchfpi._options import Options, check_integer, check_positive
from torchfpi._problem import State
from torchfpi._solution import Solution, warn_user
from torchfpi._solve import FPILayer, solve_with_options
from torchfpi._spectral import spectral_radius
from torchfpi.errors import ConvergenceWarning

_ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu, "tanh": torch.tanh, "elu": F.elu, "softplus": F.softplus,
}
_OUT = {None: None, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


def _check_gamma(gamma: object) -> float:
    value = check_positive("gamma", gamma)
    if value > 1:
        raise ValueError(f"gamma: expected a number in (0, 1], got {gamma!r}")
    return value


def _check_shape(name: str, t: object, sample: Tuple[Optional[int], ...], owner: str) -> None:
    """Raise unless ``t`` is a tensor of shape ``(B, *sample)`` (None: any size there).

    A missing batch dimension is the usual slip: a ``(3,)`` input would otherwise be read as a
    batch of three scalars, so the message says how to add it.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: {owner} expects a torch.Tensor, got {type(t).__name__}")
    want = "(B, " + ", ".join("*" if d is None else str(d) for d in sample) + ")"
    ok = t.dim() == 1 + len(sample) and all(d is None or t.shape[1 + i] == d for i, d in enumerate(sample))
    if not ok:
        hint = f"; for one sample add the batch dimension: {name}.unsqueeze(0)" if t.dim() == len(sample) else ""
        raise ValueError(f"{name}: {owner} expects shape {want}, got {tuple(t.shape)}{hint}")


def _spectral_norm(module: nn.Module, name: str) -> None:
    """Normalise ``module.<name>`` to spectral norm 1 with torch's parametrisation.

    torch's ``spectral_norm`` (the one implementation in torchfpi: these layers, the multi-label
    and the denoising applications) starts from 15 power iterations, so a fresh layer is
    normalised (the former own estimate, one half step from a random vector, left a new
    ``MLPUpdate``'s ``W_z`` at norm 2.55 in eval mode), and advances one iteration per access
    of the weight in training mode. :meth:`MLPUpdate.prepare` reads each weight once per layer
    call, so the map stays the same function across the iterations of one solve.
    """
    nn.utils.parametrizations.spectral_norm(module, name)


def _owner(module: nn.Module) -> str:
    """The class name for messages (a parametrised module's class is ``Parametrized<Name>``)."""
    name = type(module).__name__
    return name[len("Parametrized"):] if name.startswith("Parametrized") else name


def _legacy_spectral_keys(weights: Dict[str, str]) -> Callable[..., None]:
    """A load-state-dict pre-hook reading torchfpi 0.1's own spectral-norm state.

    0.1 stored the raw weight under its plain name and one vector ``sn_*.u``; its eval-mode
    estimate ``sigma = u^T W v`` with ``v = W^T u / ||W^T u||`` is torch's ``_u^T W _v`` for
    ``_u = u`` and ``_v = v``, so an old state dict gives the same function. ``weights`` maps
    the old weight key to the old vector's (``{"Wz": "sn_z.u"}``).
    """

    def hook(module: nn.Module, state: Dict[str, Any], prefix: str, *args: Any) -> None:
        for old_weight, old_u in weights.items():
            u = state.pop(prefix + old_u, None)
            if u is None or prefix + old_weight not in state:
                continue
            W = state.pop(prefix + old_weight)
            holder, _, name = old_weight.rpartition(".")
            base = prefix + (holder + "." if holder else "") + f"parametrizations.{name}."
            state[base + "original"] = W
            state[base + "0._u"] = u
            state[base + "0._v"] = F.normalize(W.reshape(W.shape[0], -1).T @ u, dim=0)

    return hook


class MLPUpdate(nn.Module):
    r"""MLP update on [x, z]: f(z, x) = out( W_o act(W_x x + gamma W_z z + b) + b_o ).

    With ``spectral_norm=True``, ||W_z|| = ||W_o|| = 1, so Lip_z(f) <= gamma * Lip(act) *
    Lip(out) < 1 for ``gamma < 1``: the update is a contraction by construction.

    Args:
        state_dim: size of z. input_dim: size of x. hidden: width.
        gamma: contraction factor of the z pathway (0, 1].
        activation: "relu", "tanh", "elu" or "softplus". out_activation: None, "sigmoid", "tanh".
        spectral_norm: normalise W_z and W_o.

    Shapes:
        z: ``(B, state_dim)``, x: ``(B, input_dim)``.
    """

    def __init__(
        self,
        state_dim: int,
        input_dim: int,
        hidden: int = 256,
        *,
        gamma: float = 0.9,
        activation: str = "relu",
        out_activation: Optional[str] = None,
        spectral_norm: bool = True,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if out_activation not in _OUT:
            raise ValueError(f"out_activation: expected None, 'sigmoid' or 'tanh', got {out_activation!r}")
        state_dim, input_dim, hidden = (
            check_integer(name, v) for name, v in (("state_dim", state_dim), ("input_dim", input_dim), ("hidden", hidden))
        )
        gamma = _check_gamma(gamma)
        self.state_dim = state_dim
        self.input_dim = input_dim
        self.inp = nn.Linear(input_dim, hidden)
        self.Wz = nn.Parameter(torch.randn(hidden, state_dim) / math.sqrt(state_dim))
        self.out = nn.Linear(hidden, state_dim)
        self.gamma = gamma
        self.act: Callable[[Tensor], Tensor] = _ACTIVATIONS[activation]
        self.out_act: Optional[Callable[[Tensor], Tensor]] = _OUT[out_activation]
        if spectral_norm:
            _spectral_norm(self, "Wz")
            _spectral_norm(self.out, "weight")
            self._register_load_state_dict_pre_hook(
                _legacy_spectral_keys({"Wz": "sn_z.u", "out.weight": "sn_o.u"}), with_module=True)

    def init_state(self, x: Tensor) -> Tensor:
        """Zero initial state ``(B, state_dim)``."""
        _check_shape("x", x, (self.input_dim,), _owner(self))
        return x.new_zeros(x.shape[0], self.state_dim)

    def prepare(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Per-call constants: the injected input and the (normalised) weights.

        Raises:
            ValueError: ``x`` is not ``(B, input_dim)`` (a 1-D ``x`` is not taken as a batch).
        """
        _check_shape("x", x, (self.input_dim,), _owner(self))
        # one read of each (normalised) weight per call: one power iteration in training mode
        return self.inp(x), self.Wz, self.out.weight, self.out.bias

    def step(self, z: Tensor, inj: Tensor, Wz: Tensor, Wo: Tensor, bo: Tensor) -> Tensor:
        """One update from prepared constants (the fixed-point map)."""
        h = self.act(inj + self.gamma * (z @ Wz.T))
        y = F.linear(h, Wo, bo)
        return y if self.out_act is None else self.out_act(y)

    def check_state(self, z: object) -> None:
        """Raise ``ValueError`` unless ``z`` is ``(B, state_dim)`` (``TypeError``: not a tensor)."""
        _check_shape("z", z, (self.state_dim,), _owner(self))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        self.check_state(z)
        return self.step(z, *self.prepare(x))


class ConvUpdate(nn.Module):
    r"""Convolutional update for image-shaped states:
    f(z, x) = conv_o( act( conv_x(x) + gamma conv_z(z) ) ), weights spectrally normalised
    (as matrices; an approximation of the operator norm), ``z`` ``(B, C, H, W)``.

    Args:
        channels: C of z. input_channels: channels of x. hidden: hidden channels.
        kernel_size: odd kernel size. gamma, activation, spectral_norm: as :class:`MLPUpdate`.
    """

    def __init__(
        self,
        channels: int,
        input_channels: int,
        hidden: int = 32,
        *,
        kernel_size: int = 3,
        gamma: float = 0.9,
        activation: str = "relu",
        spectral_norm: bool = True,
    ) -> None:
        super().__init__()
        channels, input_channels, hidden = (
            check_integer(name, v) for name, v in (("channels", channels), ("input_channels", input_channels), ("hidden", hidden))
        )
        if check_integer("kernel_size", kernel_size) % 2 != 1:
            raise ValueError(f"kernel_size: expected an odd integer, got {kernel_size!r}")
        gamma = _check_gamma(gamma)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.channels = channels
        self.input_channels = input_channels
        self.pad = kernel_size // 2
        self.inp = nn.Conv2d(input_channels, hidden, kernel_size, padding=self.pad)
        self.Wz = nn.Parameter(torch.randn(hidden, channels, kernel_size, kernel_size) / (channels * kernel_size))
        self.Wo = nn.Parameter(torch.randn(channels, hidden, kernel_size, kernel_size) / (hidden * kernel_size))
        self.bo = nn.Parameter(torch.zeros(channels))
        self.gamma = gamma
        self.act: Callable[[Tensor], Tensor] = _ACTIVATIONS[activation]
        if spectral_norm:
            _spectral_norm(self, "Wz")
            _spectral_norm(self, "Wo")
            self._register_load_state_dict_pre_hook(
                _legacy_spectral_keys({"Wz": "sn_z.u", "Wo": "sn_o.u"}), with_module=True)

    def init_state(self, x: Tensor) -> Tensor:
        """Zero initial state ``(B, channels, H, W)``."""
        _check_shape("x", x, (self.input_channels, None, None), _owner(self))
        return x.new_zeros(x.shape[0], self.channels, *x.shape[2:])

    def prepare(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Per-call constants; ``x`` must be ``(B, input_channels, H, W)`` (else ValueError)."""
        _check_shape("x", x, (self.input_channels, None, None), _owner(self))
        # one read of each (normalised) weight per call: one power iteration in training mode
        return self.inp(x), self.Wz, self.Wo, self.bo

    def step(self, z: Tensor, inj: Tensor, Wz: Tensor, Wo: Tensor, bo: Tensor) -> Tensor:
        h = self.act(inj + self.gamma * F.conv2d(z, Wz, padding=self.pad))
        return F.conv2d(h, Wo, bo, padding=self.pad)

    def check_state(self, z: object) -> None:
        """Raise ``ValueError`` unless ``z`` is ``(B, channels, H, W)`` (``TypeError``: not a tensor)."""
        _check_shape("z", z, (self.channels, None, None), _owner(self))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        self.check_state(z)
        return self.step(z, *self.prepare(x))


class FPINN(FPILayer):
    r"""FPI_NN: z* = update(z*, x), the update a small network of (z, x).

    ``update`` is any module ``update(z, x) -> z_like``. Updates with ``prepare(x)`` and
    ``step(z, *prepared)`` (as :class:`MLPUpdate`, :class:`ConvUpdate`) have their per-call
    constants (injected input, normalised weights) computed once per solve instead of once per
    iteration; with ``init_state(x)`` they also provide z0, and with ``check_state(z)`` a given
    ``z0`` is checked. The built-in updates check the input's shape: a 1-D ``x`` for an
    :class:`MLPUpdate` is a ``ValueError`` naming the expected ``(B, input_dim)``, never a
    batch of scalars.

    Args:
        update: the update network. With ``prepare``, its first prepared tensor is the
            per-sample injection and the rest are shared (never sliced by ``compact``).
        init: optional ``init(x) -> z0``; default ``update.init_state`` when it exists.
        options, **keywords: the options of :func:`torchfpi.fixed_point`, as :class:`FPILayer`
            (``solver``, ``backward``, ``tol``, ``max_iter``, ``backward_tol``,
            ``backward_max_iter``, ``on_failure``, ``residual``, ``compact``, ``batched``,
            ``per_sample``, ``compute_dtype``, ``cuda_graph``, ``stop``).

    Shapes:
        x: ``(B, ...)``; returns z* ``(B, ...)``.

    Raises:
        TypeError: ``update`` not callable. ValueError: (built-in updates) ``x`` or ``z0`` not
            of the update's shape, e.g. ``(B, input_dim)`` for :class:`MLPUpdate`.

    Example:
        >>> import torch, torchfpi
        >>> layer = torchfpi.FPINN(torchfpi.MLPUpdate(4, 3, hidden=16), tol=1e-5)
        >>> z = layer(torch.randn(8, 3)); z.shape
        torch.Size([8, 4])
    """

    def __init__(
        self,
        update: nn.Module,
        *,
        init: Optional[Callable[..., State]] = None,
        options: Optional[Options] = None,
        **keywords: Any,
    ) -> None:
        if not callable(update):
            raise TypeError(f"update: expected an nn.Module update(z, x) -> z_like, got {type(update).__name__}")
        if init is None and callable(getattr(update, "init_state", None)):
            init = getattr(update, "init_state")  # noqa: B009 - a method the update may lack
        super().__init__(update, init=init, options=options, **keywords)

    def solve(self, *inputs: Any, z0: Optional[State] = None) -> Solution[Any]:
        update = self.f
        if not (hasattr(update, "prepare") and hasattr(update, "step")):
            return super().solve(*inputs, z0=z0)
        start = self.initial_state(inputs, z0)
        check = getattr(update, "check_state", None)
        if z0 is not None and callable(check):
            check(z0)
        prepared = update.prepare(*inputs)
        # prepare() returns the per-sample injection first, then shared tensors (weights):
        # only the injection is sliced when compact drops stopped samples.
        sol = solve_with_options(update.step, start, prepared, self.options.replace(per_sample=(0,)))
        self.last_solution = sol
        return sol


Projection = Union[None, str, Callable[[Tensor], Tensor]]


class FPIGD(FPILayer):
    r"""FPI_GD: z* = P(z* - a grad_z E(z*, x; theta)), the minimiser of a learnable energy.

    Each iteration is one (projected) gradient-descent step on ``energy``; training through
    the layer uses the backward FPI, whose vector-Jacobian products are exact Hessian-vector
    products of E (double backward through :func:`torchfpi.energy_grad`).

    Args:
        energy: ``energy(z, *inputs) -> (B,)``.
        step_size: a > 0. The step contracts near z* iff the spectral radius of
            I - a Hessian is < 1, e.g. a < 2 / L for an L-smooth convex energy.
        learn_step_size: deprecated, no effect (a ``FutureWarning`` when ``True``). At a fixed
            point z* = P(z* - a grad E(z*)) with P the identity, ``"box"`` or any projection
            onto a convex set, z* does not depend on a, so the exact gradient w.r.t. a is
            zero: what a learned a received was the solve's truncation error. a stays the
            fixed ``step_size`` (the buffer ``log_step_size``; old checkpoints still load).
        projection: None, ``"box"`` (clamp to ``box``) or a callable ``P(z) -> z``.
        box: ``(low, high)`` bounds of the box projection.
        record_energy: keep the energy of each forward iteration in ``energy_trace``.
        init, options, **keywords: as :class:`FPILayer` (the options of
            :func:`torchfpi.fixed_point`: ``solver``, ``backward``, ``tol``, ``max_iter``,
            ``backward_tol``, ``backward_max_iter``, ``on_failure``, ``residual``, ``compact``,
            ``batched``, ``per_sample``, ``compute_dtype``, ``cuda_graph``, ``stop``); the inputs
            are per-sample unless ``per_sample`` says otherwise, and the energy's parameters are
            parameters, never sliced.

    Shapes:
        inputs: whatever ``energy`` takes; z: ``(B, *S)``.

    The layer also runs under ``torch.no_grad()`` and ``torch.inference_mode()``: each
    gradient step leaves inference mode locally (on ordinary copies of inference tensors), as
    :func:`torchfpi.energy_grad` does.

    Raises:
        TypeError: ``energy`` not callable, ``step_size`` or ``box`` not numbers.
        ValueError: ``step_size`` not finite and > 0, an unknown ``projection``, ``box`` not
            ``low < high``, or an invalid option.

    Example:
        >>> import torch, torchfpi
        >>> from torchfpi.energies import QuadraticEnergy
        >>> layer = torchfpi.FPIGD(QuadraticEnergy(2, A=2 * torch.eye(2)), step_size=0.3,
        ...                        init=lambda b: torch.zeros_like(b), tol=1e-8)
        >>> z = layer(torch.tensor([[2.0, 4.0]]))        # A^{-1} b
        >>> torch.allclose(z, torch.tensor([[1.0, 2.0]]), atol=1e-5)
        True
    """

    log_step_size: Tensor

    def __init__(
        self,
        energy: Callable[..., Tensor],
        *,
        step_size: float = 0.1,
        learn_step_size: bool = False,
        projection: Projection = None,
        box: Tuple[float, float] = (0.0, 1.0),
        record_energy: bool = False,
        init: Optional[Callable[..., Tensor]] = None,
        options: Optional[Options] = None,
        **keywords: Any,
    ) -> None:
        if not callable(energy):
            raise TypeError(f"energy: expected a callable energy(z, *inputs) -> (B,), got {type(energy).__name__}")
        step_size = check_positive("step_size", step_size)
        if not isinstance(learn_step_size, bool):
            raise TypeError(f"learn_step_size: expected a bool, got {type(learn_step_size).__name__}")
        if not (projection is None or projection == "box" or callable(projection)):
            raise ValueError(f"projection: expected None, 'box' or a callable, got {projection!r}")
        if projection == "box":
            pair = tuple(box) if isinstance(box, (tuple, list)) else ()
            if len(pair) != 2 or not all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in pair):
                raise TypeError(f"box: expected a pair of numbers (low, high), got {box!r}")
            if not pair[0] < pair[1]:
                raise ValueError(f"box: expected (low, high) with low < high, got {box!r}")
        super().__init__(self._gd_step, init=init, options=options, **keywords)
        del self.f  # the map is the bound method below; keep the module tree clean
        self.energy = energy
        if learn_step_size:
            warnings.warn(
                "FPIGD(learn_step_size=True) is deprecated and has no effect: the fixed point "
                "z* = P(z* - a grad E(z*)) does not depend on the step size a (for P the identity, "
                "'box' or a convex projection), so its exact gradient is zero and training only saw "
                "truncation noise. The step size stays fixed at step_size; tune it (below 2 / the "
                "largest Hessian eigenvalue) or use solver='anderson' for speed.",
                FutureWarning,
                stacklevel=2,
            )
        self.register_buffer("log_step_size", torch.tensor(math.log(step_size)))
        self.projection = projection
        self.box = (float(box[0]), float(box[1]))
        self.record_energy = record_energy
        self._energies: Optional[List[Tensor]] = None
        self.energy_trace: Optional[Tensor] = None

    @property
    def step_size(self) -> Tensor:
        """The (positive) step size a."""
        return self.log_step_size.exp()

    def project(self, z: Tensor) -> Tensor:
        """Apply the projection P."""
        if self.projection is None:
            return z
        if self.projection == "box":
            return z.clamp(self.box[0], self.box[1])
        return self.projection(z)  # type: ignore[operator]

    def _gd_step(self, z: Tensor, *inputs: Any) -> Tensor:
        if self._energies is not None and not torch.is_grad_enabled():
            e, g = energy_and_grad(self.energy, z.detach(), inputs)
            self._energies.append(e.detach())
        else:
            g = energy_grad(self.energy, z, *inputs)
        a = self.step_size.to(dtype=z.dtype)
        return self.project(z - a * g)

    def map(self, z: State, *inputs: Any) -> State:
        """f(z, \\*inputs) = P(z - a grad_z E(z, \\*inputs))."""
        return self._gd_step(z, *inputs)  # type: ignore[arg-type]  # FPIGD states are tensors

    def solve(self, *inputs: Any, z0: Optional[State] = None) -> Solution[Any]:
        start = self.initial_state(inputs, z0)
        self._energies = [] if self.record_energy else None
        try:
            sol = solve_with_options(self._gd_step, start, inputs, self.options)
        finally:
            energies, self._energies = self._energies, None
        if energies:
            sizes = {e.shape[0] for e in energies}
            self.energy_trace = torch.stack(energies) if len(sizes) == 1 else None
        self.last_solution = sol
        return sol

    def contraction_check(self, *inputs: Any, z: Optional[Tensor] = None, iters: int = 30) -> Tensor:
        r"""Estimate the spectral radius of I - a grad^2 E at z (default: the last z*), per sample.

        Warns (:class:`ConvergenceWarning`) when it is >= 1: the gradient step does not
        contract there, and ``step_size`` should be lowered.

        Returns:
            ``(B,)`` estimates.
        """
        if z is None:
            if self.last_solution is None:
                raise ValueError("z: no solve has run yet; pass z=... or call the layer first")
            z = self.last_solution.value  # type: ignore[assignment]
        radius = spectral_radius(self._gd_step, z.detach(), *inputs, iters=iters)  # type: ignore[union-attr]
        worst = float(radius.max())
        if worst >= 1.0:
            warn_user(
                f"FPIGD: the gradient step is not contractive near z* (spectral radius of "
                f"I - a*Hessian up to {worst:.3f} >= 1 with step_size={float(self.step_size):.3g}); "
                "use a smaller step_size (below 2 / largest Hessian eigenvalue)",
                ConvergenceWarning,
            )
        return radius
