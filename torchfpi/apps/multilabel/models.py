"""The four multi-label models, compared on the same features: MLP, SPEN, FPI_NN and FPI_GD.

All four share the same unary network, the strong MLP ``D -> H -> L`` (input dropout, ReLU,
hidden dropout) that produces label scores ``s(x)`` (logits). They differ in how the output
logits ``z`` are inferred from ``s``:

* ``mlp``: ``z = s``, independent labels.
* ``spen``: ``z_T`` after ``T`` unrolled gradient steps on the label energy below, started at
  ``z_0 = s``; trained by back-propagating through the ``T`` steps (the SPEN / DVN recipe).
* ``fpi_gd``: the fixed point of the same gradient step, ``z* = z* - α ∇_z E(z*; s)``, found by
  forward FPI and trained with the implicit gradient (backward FPI), via :class:`torchfpi.FPIGD`.
* ``fpi_nn``: the fixed point of an update network on ``[h(x), σ(z)]``,
  ``z* = s + W_b tanh(W_a σ(z*) + U h + b)``, spectrally normalised so that it contracts,
  via :class:`torchfpi.FPINN`.

The label energy is the public :class:`torchfpi.energies.MultiLabelEnergy`, on logits ``z ∈ R^L``
with ``y = σ(z)``:

    E(z; x) = τ/2 ||z||² - <z, s(x)> + Σ_k c_k softplus(C_k · σ(z) + b_k + (U h(x))_k)

The first two terms alone give ``z* = s / τ`` (the MLP when τ = 1); the third is SPEN's global
label-interaction energy on the relaxed labels ``σ(z) ∈ (0, 1)``, optionally with an
input-dependent bias ``U h(x)`` (``energy_condition``). Working on logits keeps every label
differentiable (a box projection on ``y`` would zero the gradient of saturated labels) and lets
the loss be the usual one on logits. ``energy_kind="icnn"`` swaps the interaction term for an
input-convex network (``MultiLabelEnergy(..., convex_input=H)``).

Example:
    >>> import torch
    >>> model = MultiLabelModel("fpi_gd", num_features=20, num_labels=5,
    ...                         cfg=ModelConfig(hidden=16, energy_hidden=4)).eval()
    >>> z = model(torch.rand(3, 20)); z.shape, bool(model.last_solution.converged.all())
    (torch.Size([3, 5]), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, cast

import torch
from torch import nn

from torchfpi import energy_grad
from torchfpi.energies import MultiLabelEnergy

MODELS = ("mlp", "spen", "fpi_nn", "fpi_gd")


@dataclass
class ModelConfig:
    """Architecture and inference options of the multi-label models.

    Attributes:
        hidden: width of the unary MLP's hidden layer.
        input_dropout, hidden_dropout: dropout rates of the unary MLP.
        energy_hidden: number K of label-interaction units (rows of ``C``) of the energy.
        energy_condition: add ``U h(x)`` to the interaction units' bias (x-dependent energy).
        energy_init_scale: scale of the random initial weights ``c`` of the interaction units.
        energy_space: ``"prob"``: the interaction term acts on ``σ(z)``; ``"logit"``: on ``z``.
        energy_kind: ``"label"`` (the softplus interaction term of
            :class:`torchfpi.energies.MultiLabelEnergy`) or ``"icnn"`` (its input-convex
            interaction term, convex in z, so its minimiser is unique).
        energy_max_norm: if > 0, rescale ``C`` to spectral norm <= 1 and ``c`` to Euclidean norm
            <= this value in every forward. With ``"prob"`` space, τ = 1 and step 1 the gradient
            step then contracts by construction when the value is below about 5 (see
            :class:`torchfpi.energies.MultiLabelEnergy`).
        update_hidden: width of FPI_NN's update network.
        update_max_gain: upper bound (< 4) of FPI_NN's learned output gain; the update's Lipschitz
            constant in z is at most a quarter of it.
        update_gain_init: FPI_NN's initial gain as a fraction of ``update_max_gain`` (small: the
            model starts as the unary MLP and learns the label interactions from there).
        update_tied: FPI_NN's output weights are the transpose of its input weights
            (``z <- s + g W^T tanh(W σ(z) + U h)``, the shape of an energy's gradient step).
        tau: weight of the quadratic term of the energy.
        step_size: gradient step α of SPEN and FPI_GD.
        unroll_steps: T, number of unrolled steps of SPEN.
        tol, max_iter: forward fixed-point tolerance (relative residual) and iteration cap.
        backward_tol, backward_max_iter: the same for the backward (adjoint) fixed point.
        solver: forward solver of FPI_GD / FPI_NN (``"fpi"`` or ``"anderson"``).
        backward: backward mode of FPI_GD / FPI_NN (``"fpi"``, ``"anderson"``, ...; see
            :func:`torchfpi.fixed_point`).
    """

    hidden: int = 1024
    input_dropout: float = 0.3
    hidden_dropout: float = 0.5
    energy_hidden: int = 16
    energy_condition: bool = False
    energy_init_scale: float = 0.0
    energy_space: str = "prob"
    energy_max_norm: float = 0.0
    energy_kind: str = "label"
    update_hidden: int = 128
    update_max_gain: float = 3.6
    update_gain_init: float = 0.5
    update_tied: bool = False
    tau: float = 1.0
    step_size: float = 1.0
    unroll_steps: int = 10
    tol: float = 1e-4
    max_iter: int = 50
    backward_tol: float = 1e-4
    backward_max_iter: int = 50
    solver: str = "fpi"
    backward: str = "fpi"


class UnaryMLP(nn.Module):
    """Label scores ``s(x)``: ``Linear(D, H) -> ReLU -> Dropout -> Linear(H, L)``, input dropout.

    ``forward(x)`` returns ``(s, h)`` with ``s`` of shape ``(B, L)`` and the hidden features
    ``h`` of shape ``(B, H)`` (after dropout).
    """

    def __init__(self, num_features: int, num_labels: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_dropout = nn.Dropout(cfg.input_dropout)
        self.hidden = nn.Linear(num_features, cfg.hidden)
        self.hidden_dropout = nn.Dropout(cfg.hidden_dropout)
        self.out = nn.Linear(cfg.hidden, num_labels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden_dropout(torch.relu(self.hidden(self.input_dropout(x))))
        return self.out(h), h


class MultiLabelModel(nn.Module):
    """One of ``mlp``, ``spen``, ``fpi_nn``, ``fpi_gd`` (see the module docstring).

    ``forward(x)`` takes ``(B, D)`` features and returns ``(B, L)`` logits; after a forward in a
    structured model, ``self.last_solution`` holds the solver's statistics (iteration counts, and
    after ``backward()`` the backward solve's statistics) for logging only.
    """

    # Sub-modules whose type depends on ``kind`` and the config (typed loosely for the checker).
    energy: Any
    layer: Any
    w_a: Any
    w_b: Any
    u: Any
    energy_u: Any

    def __init__(self, kind: str, num_features: int, num_labels: int, cfg: Optional[ModelConfig] = None) -> None:
        super().__init__()
        if kind not in MODELS:
            raise ValueError(f"model: expected one of {MODELS}, got '{kind}'")
        self.kind = kind
        self.cfg = cfg = cfg or ModelConfig()
        self.unary = UnaryMLP(num_features, num_labels, cfg)
        self.last_solution: Any = None
        if cfg.energy_kind not in ("label", "icnn"):
            raise ValueError(f"energy_kind: expected 'label' or 'icnn', got {cfg.energy_kind!r}")
        if kind in ("spen", "fpi_gd") and cfg.energy_kind == "icnn":
            self.energy = MultiLabelEnergy(num_labels, cfg.energy_hidden, cfg.tau, convex_input=cfg.hidden)
        elif kind in ("spen", "fpi_gd"):
            self.energy = MultiLabelEnergy(num_labels, cfg.energy_hidden, cfg.tau,
                                           init_scale=cfg.energy_init_scale, space=cfg.energy_space)
            if cfg.energy_condition:
                self.energy_u = nn.Linear(cfg.hidden, cfg.energy_hidden)
            if cfg.energy_max_norm > 0:
                # torch's spectral norm, as FPI_NN's update and the core layers (one implementation)
                nn.utils.parametrizations.spectral_norm(self.energy.C)
            self._register_load_state_dict_pre_hook(_legacy_power_u, with_module=True)
        if kind == "fpi_nn":
            sn = nn.utils.parametrizations.spectral_norm
            self.w_a = sn(nn.Linear(num_labels, cfg.update_hidden, bias=False))
            if not cfg.update_tied:
                self.w_b = sn(nn.Linear(cfg.update_hidden, num_labels, bias=False))
            self.u = nn.Linear(cfg.hidden, cfg.update_hidden)
            # Lipschitz constant of the update in z is at most gain/4 (σ' <= 1/4, ||W|| <= 1).
            if not 0 < cfg.update_gain_init < 1:
                raise ValueError(f"update_gain_init: expected a fraction in (0, 1), got {cfg.update_gain_init}")
            self.gain_logit = nn.Parameter(torch.tensor(math.log(cfg.update_gain_init / (1 - cfg.update_gain_init))))
        if kind in ("fpi_gd", "fpi_nn"):
            self._build_layer()
        if not 0 < cfg.update_max_gain < 4:
            raise ValueError(f"update_max_gain: expected a value in (0, 4), got {cfg.update_max_gain}")

    # -- FPI_NN update -------------------------------------------------------------------
    def _gain(self) -> torch.Tensor:
        return self.cfg.update_max_gain * torch.sigmoid(self.gain_logit)  # < 4: contracts by construction

    def _nn_update(self, z: torch.Tensor, s: torch.Tensor, hu: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(self.w_a(torch.sigmoid(z)) + hu)
        out = t @ self.w_a.weight if self.cfg.update_tied else self.w_b(t)
        return s + self._gain() * out

    def _gd_update(self, z: torch.Tensor, s: torch.Tensor, *energy_inputs: Any) -> torch.Tensor:
        return z - self.cfg.step_size * energy_grad(self.energy, z, s, *energy_inputs)

    def _bounded_energy_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``C / max(1, ||C||₂)`` and ``c`` clipped in norm, computed once per forward.

        ``C.weight`` is torch's spectral normalisation ``C / σ`` (one power iteration per access in
        training mode); ``σ = ||C||_F / ||C / σ||_F`` recovers the estimate, so the bound leaves
        a ``C`` of norm below 1 as it is and rescales a larger one to norm 1.
        """
        linear = self.energy.C
        unit = linear.weight
        sigma = linear.parametrizations.weight.original.norm() / unit.norm()
        W = unit * sigma.clamp_max(1.0)
        c = self.energy.c
        c = c * (self.cfg.energy_max_norm / c.norm().clamp_min(self.cfg.energy_max_norm))
        return W, c

    def _build_layer(self) -> None:
        import torchfpi

        opts = torchfpi.Options(
            tol=self.cfg.tol,
            max_iter=self.cfg.max_iter,
            backward_tol=self.cfg.backward_tol,
            backward_max_iter=self.cfg.backward_max_iter,
            solver=self.cfg.solver,
            backward=self.cfg.backward,
            on_failure="ignore",
        )
        if self.kind == "fpi_gd":
            self.layer = torchfpi.FPIGD(self.energy, step_size=self.cfg.step_size, options=opts)
        else:
            # a bound method of this module as the update: its parameters are the model's own
            self.layer = torchfpi.FPINN(self._nn_update, options=opts)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, h = self.unary(x)
        if self.kind == "mlp":
            return s
        if self.kind in ("spen", "fpi_gd") and self.cfg.energy_kind == "icnn":
            extra: tuple[Any, ...] = (h,)
        elif self.kind in ("spen", "fpi_gd"):
            bias = self.energy_u(h) if self.cfg.energy_condition else None
            extra = (bias,)
            if self.cfg.energy_max_norm > 0:
                extra = (bias, *self._bounded_energy_weights())
        if self.kind == "spen":
            z = s
            for _ in range(self.cfg.unroll_steps):
                z = self._gd_update(z, s, *extra)
            return z
        if self.kind == "fpi_gd":
            sol = self.layer.solve(s, *extra, z0=s.detach())
        else:
            sol = self.layer.solve(s, self.u(h), z0=s.detach())
        self.last_solution = sol
        return cast(torch.Tensor, sol.value)  # a tensor z0 gives a tensor value


def _legacy_power_u(model: MultiLabelModel, state: Dict[str, Any], prefix: str, *args: Any) -> None:
    """Read an energy model's state dict of torchfpi <= 0.1 (its own power iteration's ``_power_u``).

    Its estimate was ``σ = u'ᵀ C v`` with ``v = Cᵀu / ||Cᵀu||`` and ``u' = C v / ||C v||``; torch's
    spectral norm computes ``σ = _uᵀ C _v`` in eval mode, so ``_u = u'`` and ``_v = v`` give the
    model the same function.
    """
    old_u = state.pop(prefix + "_power_u", None)
    if old_u is None or model.cfg.energy_max_norm <= 0:
        return
    for owner in ("energy.", "layer.energy."):  # FPI_GD's layer holds the energy too
        W = state.pop(prefix + owner + "C.weight", None)
        if W is None:
            continue
        v = torch.nn.functional.normalize(W.t() @ old_u, dim=0)
        base = prefix + owner + "C.parametrizations.weight."
        state[base + "original"] = W
        state[base + "0._u"] = torch.nn.functional.normalize(W @ v, dim=0)
        state[base + "0._v"] = v
