"""Benchmark problems: one fixed-point map ``f(z, *inputs)`` per problem, shared by every method.

Each problem is built deterministically from a seed, so the float32 instance that the methods
run on and the float64 instance that the reference gradient is computed on hold the same
numbers. The inputs handed to ``f`` are leaf tensors (the layer's injected input and its
effective weights), so all methods differentiate exactly the same function with respect to
exactly the same tensors, and the loss is the fixed linear functional ``L = <w, z*>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from torchfpi import energy_grad

Map = Callable[..., Tensor]


@dataclass
class Instance:
    """A problem ready to run: the map, the start, the inputs and the loss weights.

    Attributes:
        name: problem name.
        f: the map ``f(z, *inputs) -> z_like``, ``z`` ``(B, *S)``.
        z0: ``(B, *S)`` initial iterate (no gradient).
        inputs: explicit inputs of ``f``; the floating ones are leaves requiring grad.
        params: the tensors whose gradients are measured (here: ``inputs`` that require grad,
            plus module parameters that ``f`` captures, if any).
        weight: ``(B, *S)`` loss weights, ``L = (weight * z*).sum()``.
        per_sample: ``f`` treats samples independently (compaction is allowed).
        sample_inputs: indices of the ``inputs`` with the batch as dim 0 (the others are
            shared weights): ``fixed_point(..., per_sample=sample_inputs)``.
        description: one line for the report.
        sizes: the size knobs used to build it.
    """

    name: str
    f: Map
    z0: Tensor
    inputs: Tuple[Tensor, ...]
    params: List[Tensor]
    weight: Tensor
    per_sample: bool
    description: str
    sizes: Dict[str, float] = field(default_factory=dict)
    sample_inputs: Tuple[int, ...] = (0,)

    @property
    def batch(self) -> int:
        return int(self.z0.shape[0])

    @property
    def state_numel(self) -> int:
        """Entries of the whole state, batch included."""
        return int(self.z0.numel())


def _leaf(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    return t.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)


def _loss_weight(shape: Tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


# Sizes: full (the published benchmark) and quick (tests, smoke runs).
SIZES: Dict[str, Dict[str, Dict[str, float]]] = {
    "mlp": {
        "full": {"batch": 128, "dim": 256, "hidden": 256, "gamma": 0.9},
        "quick": {"batch": 8, "dim": 16, "hidden": 16, "gamma": 0.5},
    },
    "conv": {
        "full": {"batch": 4, "channels": 16, "hidden": 32, "height": 32, "width": 32, "gamma": 0.9},
        "quick": {"batch": 2, "channels": 3, "hidden": 4, "height": 6, "width": 6, "gamma": 0.9},
    },
    "multilabel": {
        "full": {"batch": 128, "labels": 159, "interactions": 16, "step_size": 0.1, "mu": 1.0, "score_scale": 0.5},
        "quick": {"batch": 8, "labels": 12, "interactions": 4, "step_size": 0.1, "mu": 1.0, "score_scale": 0.5},
    },
    "mixed": {
        "full": {"batch": 128, "dim": 256, "fast": 0.3, "slow": 0.95, "slow_fraction": 0.125},
        "quick": {"batch": 8, "dim": 16, "fast": 0.3, "slow": 0.95, "slow_fraction": 0.25},
    },
    "smooth_gd": {
        "full": {"batch": 128, "dim": 128, "interactions": 16, "mu": 0.05},
        "quick": {"batch": 8, "dim": 12, "interactions": 4, "mu": 0.2},
    },
}
SIZES["deq"] = {
    "full": {"batch": 128, "dim": 256, "gamma": 0.9},
    "quick": {"batch": 8, "dim": 16, "gamma": 0.9},
}
SIZES["deq_small"] = {
    "full": {"batch": 32, "dim": 64, "gamma": 0.9},
    "quick": {"batch": 4, "dim": 8, "gamma": 0.9},
}
PROBLEMS = tuple(SIZES)


def _mlp(sizes: Dict[str, float], gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> Instance:
    from torchfpi import MLPUpdate

    b, d, h = int(sizes["batch"]), int(sizes["dim"]), int(sizes["hidden"])
    torch.manual_seed(int(gen.initial_seed()))
    update = MLPUpdate(d, d, hidden=h, gamma=float(sizes["gamma"]), activation="relu").double().eval()
    x = torch.randn(b, d, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        inj, Wz, Wo, bo = update.prepare(x)
    update = update.to(device=device, dtype=dtype)
    inputs = tuple(_leaf(t, dtype, device) for t in (inj, Wz, Wo, bo))
    return Instance(
        name="mlp",
        f=update.step,
        z0=torch.zeros(b, d, dtype=dtype, device=device),
        inputs=inputs,
        params=list(inputs),
        weight=_loss_weight((b, d), gen, dtype, device),
        per_sample=True,
        description=(
            f"DEQ MLP layer torchfpi.MLPUpdate: z = W_o relu(inj + {sizes['gamma']} W_z z) + b_o, "
            f"spectrally normalised weights, B={b}, d={d}, hidden={h}"
        ),
        sizes=dict(sizes),
    )


def deq_map(z: Tensor, inj: Tensor, W: Tensor) -> Tensor:
    """``tanh(z W^T + inj)``: the DEQ layer z = tanh(W z + U x + b) with ``inj = U x + b``."""
    return torch.tanh(torch.addmm(inj, z, W.T))


def _deq(sizes: Dict[str, float], gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> Instance:
    b, d, gamma = int(sizes["batch"]), int(sizes["dim"]), float(sizes["gamma"])
    W = torch.randn(d, d, generator=gen, dtype=torch.float64)
    W = gamma * W / torch.linalg.matrix_norm(W, 2)
    U = torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    bias = 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)
    x = torch.randn(b, d, generator=gen, dtype=torch.float64)
    inj = x @ U.T + bias
    inputs = tuple(_leaf(t, dtype, device) for t in (inj, W))
    return Instance(
        name="deq",
        f=deq_map,
        z0=torch.zeros(b, d, dtype=dtype, device=device),
        inputs=inputs,
        params=list(inputs),
        weight=_loss_weight((b, d), gen, dtype, device),
        per_sample=True,
        description=f"DEQ layer z = tanh(W z + U x + b), ||W||_2 = {gamma}, B={b}, d={d}",
        sizes=dict(sizes),
    )


def _conv(sizes: Dict[str, float], gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> Instance:
    from torchfpi import ConvUpdate

    b, c, h = int(sizes["batch"]), int(sizes["channels"]), int(sizes["hidden"])
    hh, ww = int(sizes["height"]), int(sizes["width"])
    torch.manual_seed(int(gen.initial_seed()))
    update = ConvUpdate(c, c, hidden=h, gamma=float(sizes["gamma"])).double().eval()
    x = torch.randn(b, c, hh, ww, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        inj, Wz, Wo, bo = update.prepare(x)
    update = update.to(device=device, dtype=dtype)
    inputs = tuple(_leaf(t, dtype, device) for t in (inj, Wz, Wo, bo))
    return Instance(
        name="conv",
        f=update.step,
        z0=torch.zeros(b, c, hh, ww, dtype=dtype, device=device),
        inputs=inputs,
        params=list(inputs),
        weight=_loss_weight((b, c, hh, ww), gen, dtype, device),
        per_sample=True,
        description=(
            f"convolutional DEQ layer torchfpi.ConvUpdate (3x3 convs, relu, gamma {sizes['gamma']}): "
            f"state B={b} x {c} x {hh} x {ww}, hidden {h} channels"
        ),
        sizes=dict(sizes),
    )


def multilabel_gd_map(step_size: float, mu: float, labels: int, interactions: int,
                      dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> Map:
    r"""The FPI_GD map of :class:`torchfpi.energies.MultiLabelEnergy` with a box projection.

    ``f(y, s, C_w, C_b, c) = clamp(y - a grad_y E(y, s), 0, 1)`` with the library's energy in
    its logit form, ``E = -<s, y> + c^T softplus(C_w y + C_b) + mu/2 ||y - 1/2||^2`` (``C_w``,
    ``C_b`` and ``c`` passed in as the energy's ``weight``, ``context`` and ``c``, so they are
    inputs the benchmark differentiates), the gradient taken by autograd inside ``f``
    (:func:`torchfpi.energy_grad`, as FPI_GD does), with ``create_graph`` whenever the caller
    records a graph, so VJPs of ``f`` are second derivatives of ``E``.
    """
    from torchfpi.energies import MultiLabelEnergy

    # its own parameters are not the benchmark's: C's weight and c come in as inputs, its zero
    # bias stays fixed
    energy = MultiLabelEnergy(labels, interactions, tau=mu, space="logit", center=0.5).to(dtype=dtype, device=device)
    energy.requires_grad_(False)

    def f(y: Tensor, s: Tensor, Cw: Tensor, Cb: Tensor, c: Tensor) -> Tensor:
        return torch.clamp(y - step_size * energy_grad(energy, y, s, Cb, Cw, c), 0.0, 1.0)

    return f


def _multilabel(sizes: Dict[str, float], gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> Instance:
    b, n_l, k = int(sizes["batch"]), int(sizes["labels"]), int(sizes["interactions"])
    a, mu = float(sizes["step_size"]), float(sizes["mu"])
    s = float(sizes["score_scale"]) * torch.randn(b, n_l, generator=gen, dtype=torch.float64)
    Cw = torch.randn(k, n_l, generator=gen, dtype=torch.float64) / n_l**0.5
    Cb = 0.1 * torch.randn(k, generator=gen, dtype=torch.float64)
    c = torch.rand(k, generator=gen, dtype=torch.float64)
    inputs = tuple(_leaf(t, dtype, device) for t in (s, Cw, Cb, c))
    return Instance(
        name="multilabel",
        f=multilabel_gd_map(a, mu, n_l, k, dtype, device),
        z0=torch.full((b, n_l), 0.5, dtype=dtype, device=device),
        inputs=inputs,
        params=list(inputs),
        weight=_loss_weight((b, n_l), gen, dtype, device),
        per_sample=True,
        description=(
            f"FPI_GD on the multi-label energy (torchfpi.energies.MultiLabelEnergy form): "
            f"y = clamp(y - {a} grad E(y, s), 0, 1), B={b}, L={n_l} labels, {k} interactions"
        ),
        sizes=dict(sizes),
    )


def _mixed(sizes: Dict[str, float], gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> Instance:
    b, d = int(sizes["batch"]), int(sizes["dim"])
    n_slow = max(1, round(b * float(sizes["slow_fraction"])))
    # Orthogonal weights and small injections keep tanh near its linear range, so the
    # contraction factor of sample i is close to r_i: the rates really differ per sample.
    Wz = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    Wo = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    inj = 0.1 * torch.randn(b, d, generator=gen, dtype=torch.float64)
    bo = 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)
    rate = torch.full((b, 1), float(sizes["fast"]), dtype=torch.float64)
    slow = torch.randperm(b, generator=gen)[:n_slow]
    rate[slow] = float(sizes["slow"])

    def f(z: Tensor, inj: Tensor, rate: Tensor, Wz: Tensor, Wo: Tensor, bo: Tensor) -> Tensor:
        return rate * (torch.tanh(inj + z @ Wz.T) @ Wo.T + bo)

    inputs = (
        _leaf(inj, dtype, device),
        rate.to(device=device, dtype=dtype),  # a constant: no gradient
        *(_leaf(t, dtype, device) for t in (Wz, Wo, bo)),
    )
    return Instance(
        name="mixed",
        f=f,
        z0=torch.zeros(b, d, dtype=dtype, device=device),
        inputs=inputs,
        params=[t for t in inputs if t.requires_grad],
        weight=_loss_weight((b, d), gen, dtype, device),
        per_sample=True,
        sample_inputs=(0, 1),
        description=(
            f"mixed-rate batch: z = r_i (W_o tanh(inj + W_z z) + b_o), W orthogonal, r_i = "
            f"{sizes['fast']} for {b - n_slow} samples and {sizes['slow']} for {n_slow}; B={b}, d={d}"
        ),
        sizes=dict(sizes),
    )


def smooth_gd_map(step_size: float) -> Map:
    r"""FPI_GD on a smooth, ill-conditioned energy, without projection.

    ``f(y, s, M, C_w, C_b, c) = y - a grad_y E(y, s)`` with
    ``E = 1/2 ||M y||^2 + mu/2 ||y||^2 - <s, y> + c^T softplus(C_w y + C_b)`` (``mu`` folded into
    ``M``'s construction, see :func:`_smooth_gd`), the gradient by autograd inside ``f`` (as FPI_GD
    does). The Jacobian ``I - a Hess E`` is symmetric with a real spectrum in ``[0, 1 - a mu]``: a
    slowly contracting map of the kind Krylov-type acceleration (Anderson) is made for.
    """
    import torch.nn.functional as F

    def energy(y: Tensor, s: Tensor, M: Tensor, Cw: Tensor, Cb: Tensor, c: Tensor) -> Tensor:
        return 0.5 * (F.linear(y, M) ** 2).sum(1) - (s * y).sum(1) + F.softplus(F.linear(y, Cw, Cb)) @ c

    def f(y: Tensor, s: Tensor, M: Tensor, Cw: Tensor, Cb: Tensor, c: Tensor) -> Tensor:
        return y - step_size * energy_grad(energy, y, s, M, Cw, Cb, c)

    return f


def _smooth_gd(sizes: Dict[str, float], gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> Instance:
    b, n, k = int(sizes["batch"]), int(sizes["dim"]), int(sizes["interactions"])
    mu = float(sizes["mu"])
    # M^T M = Q diag(lam) Q^T with lam evenly spread over [mu, 1]: a condition number of 1/mu.
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    lam = torch.linspace(mu, 1.0, n, dtype=torch.float64)
    M = (Q * lam.sqrt()) @ Q.T
    s = torch.randn(b, n, generator=gen, dtype=torch.float64)
    Cw = torch.randn(k, n, generator=gen, dtype=torch.float64) / n**0.5
    Cb = 0.1 * torch.randn(k, generator=gen, dtype=torch.float64)
    c = 0.1 * torch.rand(k, generator=gen, dtype=torch.float64)
    # Step 1/L with L >= the largest Hessian eigenvalue (softplus'' <= 1/4).
    lip = 1.0 + 0.25 * float(c.max()) * float(torch.linalg.matrix_norm(Cw, 2)) ** 2
    a = 1.0 / lip
    inputs = tuple(_leaf(t, dtype, device) for t in (s, M, Cw, Cb, c))
    return Instance(
        name="smooth_gd",
        f=smooth_gd_map(a),
        z0=torch.zeros(b, n, dtype=dtype, device=device),
        inputs=inputs,
        params=list(inputs),
        weight=_loss_weight((b, n), gen, dtype, device),
        per_sample=True,
        description=(
            f"FPI_GD on a smooth ill-conditioned energy (no projection): y = y - a grad E(y, s), "
            f"E = 1/2 |M y|^2 - <s, y> + c^T softplus(C y + d), Hessian spectrum in [{mu}, ~1] "
            f"(condition ~{1 / mu:.0f}), a = {a:.3f}; B={b}, L={n}, {k} interactions"
        ),
        sizes=dict(sizes),
    )


_BUILDERS = {"mlp": _mlp, "conv": _conv, "multilabel": _multilabel, "mixed": _mixed, "smooth_gd": _smooth_gd,
             "deq": _deq, "deq_small": _deq}


def build(
    name: str,
    *,
    quick: bool = False,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    overrides: Dict[str, float] | None = None,
) -> Instance:
    """Build problem ``name`` (one of :data:`PROBLEMS`) deterministically from ``seed``.

    The numbers are drawn in float64 on the CPU and then cast, so instances of different
    dtypes or devices describe the same problem.

    Raises:
        ValueError: unknown problem name or size override.
    """
    if name not in _BUILDERS:
        raise ValueError(f"problem: expected one of {list(PROBLEMS)}, got {name!r}")
    sizes = dict(SIZES[name]["quick" if quick else "full"])
    for key, value in (overrides or {}).items():
        if key not in sizes:
            raise ValueError(f"{name}: unknown size {key!r}; expected one of {sorted(sizes)}")
        sizes[key] = value
    gen = torch.Generator().manual_seed(seed)
    return _BUILDERS[name](sizes, gen, dtype, torch.device(device))
