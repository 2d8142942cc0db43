"""A Fields-of-Experts energy for grey images, with an exact analytic gradient.

.. math::

    E(z, y) = \\frac{\\lambda}{2} \\|z - y\\|^2
              + \\sum_{k=1}^{K} \\sum_{p} \\phi_k\\big((w_k \\star z)_p\\big),
    \\qquad
    \\phi_k(x) = \\sum_{m=1}^{M} \\alpha_{km} \\log\\big(1 + x^2 / s_{km}^2\\big)

``w_k`` are zero-mean ``k x k`` filters (initialised with the 2-D DCT basis without its DC atom),
``\\star`` is a *valid* correlation (no padding: callers pad the image by reflection and crop
afterwards, so the energy is exactly the one whose gradient is used), and ``\\phi_k`` is a learned
mixture of Student-t (Lorentzian) penalties, the classic heavy-tailed image prior of the FoE /
bilevel line of work (Roth & Black 2005; Chen, Pock et al. 2013). Weights ``\\alpha_{km} > 0``,
scales ``s_{km} > 0`` and the data weight ``\\lambda > 0`` are stored as logarithms.

Optional *coarse banks* add the same kind of prior on downsampled copies of the image,

.. math::

    \\sum_{c} \\sum_{k} \\sum_{p} \\phi_{ck}\\big((v_{ck} \\star D_c z)_p\\big),

with ``D_c`` the ``f_c x f_c`` average pooling: a filter of size ``k`` at factor ``f`` sees a
``f k x f k`` window, which the small fine filters cannot (structure at high noise levels). Their
gradient adds ``D_c^T v_{ck}^T \\star \\phi_{ck}'(\\cdot)`` and their Hessian term
``D_c^T v_{ck}^T (\\phi_{ck}'' \\cdot v_{ck} D_c)``.

The gradient is

.. math::

    \\nabla_z E = \\lambda (z - y) + \\sum_k w_k^{\\top} \\star \\phi_k'(w_k \\star z),
    \\qquad \\phi_k'(x) = \\sum_m \\frac{2 \\alpha_{km} x}{s_{km}^2 + x^2},

computed with one ``conv2d`` and one ``conv_transpose2d``; autograd differentiates it exactly
(Hessian-vector products), which is what the backward fixed-point iteration needs.
"""

from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dct_filters(size: int, count: int) -> Tensor:
    """The ``count`` lowest-frequency 2-D DCT-II atoms of ``size x size`` without the DC atom.

    Returns:
        ``(count, 1, size, size)`` unit-norm, zero-mean filters.
    """
    n = torch.arange(size, dtype=torch.float64)
    basis = []
    for u in range(size):
        cu = torch.cos(math.pi * (n + 0.5) * u / size)
        basis.append(cu / cu.norm())
    pairs = sorted(((u, v) for u in range(size) for v in range(size) if (u, v) != (0, 0)),
                   key=lambda uv: (uv[0] + uv[1], max(uv), uv))
    if count > len(pairs):
        raise ValueError(f"count: at most {len(pairs)} DCT filters of size {size}, got {count}")
    atoms = [torch.outer(basis[u], basis[v]) for u, v in pairs[:count]]
    return torch.stack(atoms).unsqueeze(1).float()


def grow_energy_state(
    state: Dict[str, Tensor], n_filters: int, kernel_size: int, new_weight: float = 0.1, prefix: str = "energy."
) -> Dict[str, Tensor]:
    """A trained :class:`FoEEnergy` state (under ``prefix``) mapped to a larger filter bank.

    The trained filters are made zero-mean and zero-padded to ``kernel_size`` (the same
    responses, so the same energy up to the image border); the ``n_filters - K`` new filters are
    the next DCT atoms of the new size, scaled to the trained filters' median norm, with the
    median trained scale and ``new_weight`` times the median trained weight, so the grown energy
    starts close to the trained one and training decides what the new filters become.

    Args:
        state: a state dict holding ``{prefix}weight`` ``(K, 1, k, k)``, ``{prefix}log_alpha``
            and ``{prefix}log_scale`` ``(K, M)``; other entries are copied.
        n_filters: filters of the grown bank (``>= K``, at most ``kernel_size**2 - 1``).
        kernel_size: filter size of the grown bank (odd, ``>= k``).
        new_weight: the new filters' penalty weight relative to the median trained one.

    Returns:
        A new state dict for ``FoEEnergy(n_filters, kernel_size, M)``.

    Example:
        >>> small = {"energy." + k: v for k, v in FoEEnergy(4, 3).state_dict().items()}
        >>> grown = grow_energy_state(small, 8, 5)
        >>> tuple(grown["energy.weight"].shape), tuple(grown["energy.log_alpha"].shape)
        ((8, 1, 5, 5), (8, 1))
    """
    w = state[prefix + "weight"]
    k0, k_old = w.shape[0], w.shape[-1]
    if n_filters < k0:
        raise ValueError(f"n_filters: expected at least the {k0} trained filters, got {n_filters}")
    if kernel_size < k_old or kernel_size % 2 != 1:
        raise ValueError(f"kernel_size: expected an odd size >= the trained {k_old}, got {kernel_size}")
    q = (kernel_size - k_old) // 2
    w0 = F.pad(w - w.mean(dim=(2, 3), keepdim=True), (q, q, q, q))
    out = dict(state)
    extra = n_filters - k0
    log_alpha, log_scale = state[prefix + "log_alpha"], state[prefix + "log_scale"]
    if extra > 0:
        atoms = dct_filters(kernel_size, n_filters)[k0:].to(w)
        norm = w0.flatten(1).norm(dim=1).median()
        w0 = torch.cat([w0, atoms * norm])
        new_alpha = (log_alpha.median(dim=0).values + math.log(new_weight)).expand(extra, -1)
        new_scale = log_scale.median(dim=0).values.expand(extra, -1)
        log_alpha = torch.cat([log_alpha, new_alpha])
        log_scale = torch.cat([log_scale, new_scale])
    out.update({prefix + "weight": w0, prefix + "log_alpha": log_alpha.clone(),
                prefix + "log_scale": log_scale.clone()})
    return out


def _pool(z: Tensor, factor: int) -> Tensor:
    """``D z``: ``factor x factor`` average pooling (rows/columns beyond a multiple of ``factor`` dropped);
    the identity for factor 1 (the fine bank)."""
    return z if factor == 1 else F.avg_pool2d(z, factor)


def _unpool(u: Tensor, factor: int, size: Tuple[int, int]) -> Tensor:
    """``D^T u``: each coarse value spread over its ``factor x factor`` block (divided by ``factor^2``),
    zero on the dropped rows/columns, so that ``<D z, u> = <z, D^T u>``; the identity for factor 1."""
    if factor == 1:
        return u
    up = F.interpolate(u, scale_factor=float(factor), mode="nearest") / float(factor * factor)
    return F.pad(up, (0, size[1] - up.shape[-1], 0, size[0] - up.shape[-2]))


class _Bank(nn.Module):
    """One filter bank with its Student-t mixture penalties: ``sum_k sum_p phi_k((w_k * x)_p)``.

    Parameters: ``weight`` ``(K, 1, k, k)`` (made zero-mean by :meth:`filters`), ``log_alpha`` and
    ``log_scale`` ``(K, M)``.
    """

    def __init__(self, n_filters: int, kernel_size: int, n_mixture: int, penalty_weight: float,
                 penalty_scale: float) -> None:
        super().__init__()
        if kernel_size % 2 != 1 or kernel_size < 3:
            raise ValueError(f"kernel_size: expected an odd size >= 3, got {kernel_size}")
        self.n_filters = int(n_filters)
        self.kernel_size = int(kernel_size)
        self.n_mixture = int(n_mixture)
        self.weight = nn.Parameter(dct_filters(kernel_size, n_filters))
        alpha = torch.full((n_filters, n_mixture), float(penalty_weight))
        alpha[:, 1:] *= 0.1
        scale = float(penalty_scale) * 4.0 ** torch.arange(n_mixture, dtype=torch.float32)
        self.log_alpha = nn.Parameter(alpha.log())
        self.log_scale = nn.Parameter(scale.log().expand(n_filters, n_mixture).clone())

    def filters(self) -> Tensor:
        """Zero-mean filters ``(K, 1, k, k)``: a flat image costs nothing."""
        return self.weight - self.weight.mean(dim=(2, 3), keepdim=True)

    def _penalty_params(self) -> Tuple[Tensor, Tensor]:
        """``alpha`` and ``s^2``, each ``(M, 1, K, 1, 1)`` so that ``[m]`` broadcasts on ``(B, K, H, W)``."""
        shape = (self.n_mixture, 1, self.n_filters, 1, 1)
        alpha = self.log_alpha.exp().t().reshape(shape)
        scale2 = (2.0 * self.log_scale).exp().t().reshape(shape)
        return alpha, scale2

    def penalty(self, x: Tensor) -> Tensor:
        """``sum_k sum_p phi_k((w_k * x)_p)`` per sample, ``(B,)``."""
        r2 = F.conv2d(x, self.filters()).square()
        alpha, scale2 = self._penalty_params()
        return _total([(alpha[m] * torch.log1p(r2 / scale2[m])).sum(dim=(1, 2, 3)) for m in range(self.n_mixture)])

    def influence(self, r: Tensor) -> Tensor:
        """``phi_k'(r)`` for responses ``r`` of shape ``(B, K, H', W')``."""
        alpha, scale2 = self._penalty_params()
        r2 = r * r
        return _total([2.0 * alpha[m] * r / (scale2[m] + r2) for m in range(self.n_mixture)])

    def curvature(self, r: Tensor) -> Tensor:
        """``phi_k''(r) = sum_m 2 alpha_km (s_km^2 - r^2) / (s_km^2 + r^2)^2`` for ``(B, K, H', W')``."""
        alpha, scale2 = self._penalty_params()
        r2 = r * r
        return _total([2.0 * alpha[m] * (scale2[m] - r2) / (scale2[m] + r2) ** 2 for m in range(self.n_mixture)])

    def _adjoint(self, u: Tensor, w: Tensor) -> Tensor:
        """``sum_k w_k^T u_k`` for ``u`` of shape ``(B, K, H', W')``: ``(B, 1, H, W)``."""
        q = self.kernel_size - 1
        # w^T: a grouped correlation with the flipped filters, summed over filters. This equals
        # conv_transpose2d(u, w) and is several times faster on CPU with oneDNN.
        return F.conv2d(F.pad(u, (q, q, q, q)), w.flip(2, 3), groups=self.n_filters).sum(dim=1, keepdim=True)

    def prior_grad(self, x: Tensor) -> Tensor:
        """``sum_k w_k^T phi_k'(w_k * x)``, ``(B, 1, H, W)``."""
        w = self.filters()
        return self._adjoint(self.influence(F.conv2d(x, w)), w)

    def hessian_term(self, v: Tensor, curv: Tensor, w: Tensor) -> Tensor:
        """``sum_k w_k^T (phi_k'' (w_k * v))`` with ``phi''`` given (cached at the linearisation point)."""
        return self._adjoint(curv * F.conv2d(v, w), w)

    @torch.no_grad()
    def spectral_bound(self, grid: int) -> Tensor:
        """``max_w sum_k c_k |w_k^(w)|^2`` with ``c_k = max_x phi_k''(x) = sum_m 2 alpha_km / s_km^2``."""
        w = self.filters()[:, 0]
        spec = torch.fft.rfft2(w, s=(grid, grid)).abs() ** 2
        curv = (2.0 * self.log_alpha.exp() / (2.0 * self.log_scale).exp()).sum(dim=1)
        return (curv.view(-1, 1, 1) * spec).sum(0).max()


class _PriorGradZ(torch.autograd.Function):
    """``B(z) = sum_k w_k^T phi_k'(w_k * z)`` (plus the coarse banks' terms) with an analytic
    Hessian-vector product as its VJP in ``z``.

    The filters and penalty parameters enter as constants (no gradient): the parameter gradient
    goes through a separate autograd path (see :meth:`FoEEnergy.grad_split`). The backward is
    ``v -> sum_k w_k^T (phi_k''(w_k * z) (w_k * v))`` (and ``D^T`` of the same at each coarse
    bank): one correlation, a product with the cached ``phi''`` and one grouped correlation per
    bank, about a third of the cost of differentiating the gradient's graph by autograd.
    """

    @staticmethod
    def forward(ctx, z: Tensor, energy: FoEEnergy) -> Tensor:  # type: ignore[override]
        size = (z.shape[-2], z.shape[-1])
        parts, saved = [], []
        with torch.no_grad():
            for bank, factor in energy.banks():
                w = bank.filters()
                r = F.conv2d(_pool(z, factor), w)
                parts.append(_unpool(bank._adjoint(bank.influence(r), w), factor, size))
                saved += [bank.curvature(r), w]
        ctx.save_for_backward(*saved)
        ctx.energy, ctx.size = energy, size
        return _total(parts)

    @staticmethod
    def backward(ctx, v: Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        hv = _total([_unpool(bank.hessian_term(_pool(v, factor), saved[2 * i], saved[2 * i + 1]), factor, ctx.size)
                     for i, (bank, factor) in enumerate(ctx.energy.banks())])
        return hv, None


def _total(terms: List[Tensor]) -> Tensor:
    """``terms[0] + terms[1] + ...`` in order (what ``sum`` computes, typed as a tensor)."""
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def check_coarse(coarse: Sequence[Sequence[int]]) -> List[Tuple[int, int, int]]:
    """``coarse`` as ``[(factor, n_filters, kernel_size), ...]``, each checked."""
    out = []
    for i, spec in enumerate(coarse):
        if len(spec) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in spec):
            raise ValueError(f"coarse[{i}]: expected (factor, n_filters, kernel_size) integers, got {spec!r}")
        factor, n, k = (int(v) for v in spec)
        if not 2 <= factor <= 8:
            raise ValueError(f"coarse[{i}]: expected a pooling factor 2 .. 8, got {factor}")
        if k % 2 != 1 or k < 3:
            raise ValueError(f"coarse[{i}]: expected an odd kernel size >= 3, got {k}")
        if not 1 <= n <= k * k - 1:
            raise ValueError(f"coarse[{i}]: expected 1 .. {k * k - 1} filters of size {k}, got {n}")
        out.append((factor, n, k))
    return out


class FoEEnergy(_Bank):
    """Fields-of-Experts energy ``E(z, y)`` (see the module docstring for the equation).

    Args:
        n_filters: number of filters ``K``.
        kernel_size: filter size ``k`` (odd).
        n_mixture: Student-t terms per filter ``M``.
        data_weight: initial ``\\lambda``.
        penalty_weight: initial ``\\alpha`` of the first mixture term (later terms get a tenth).
        penalty_scale: initial ``s`` of the first term (later terms are 4x wider each).
        coarse: coarse banks, each ``(factor, n_filters, kernel_size)``: filters on the image
            average-pooled by ``factor`` (empty: the single-scale FoE). They start at a tenth of
            ``penalty_weight``.
        adaptive_channels: ``C > 0`` makes the data weight a map of the noisy image,
            ``lambda_p(y) = lambda exp(span tanh(h(y))_p)`` with ``h`` a 3-layer ``C``-channel CNN
            whose last layer starts at zero (so a trained energy is unchanged when it is added);
            0: one scalar ``lambda``.
        adaptive_span: ``span`` above: ``lambda_p`` stays within ``lambda exp(+-span)``.

    Shapes: ``z``, ``y``: ``(B, 1, H, W)`` with ``H, W >= kernel_size`` (and, for each coarse bank,
    ``>= factor * kernel_size``); energy ``(B,)``.

    Example:
        >>> e = FoEEnergy(8, 3, coarse=[(2, 4, 3)])
        >>> z = torch.rand(2, 1, 16, 16)
        >>> e(z, z).shape, e.grad(z, z).shape, e.pad
        (torch.Size([2]), torch.Size([2, 1, 16, 16]), 2)
    """

    def __init__(
        self,
        n_filters: int = 24,
        kernel_size: int = 5,
        n_mixture: int = 1,
        data_weight: float = 1.0,
        penalty_weight: float = 0.0005,
        penalty_scale: float = 0.06,
        coarse: Sequence[Sequence[int]] = (),
        adaptive_channels: int = 0,
        adaptive_span: float = 0.5,
    ) -> None:
        super().__init__(n_filters, kernel_size, n_mixture, penalty_weight, penalty_scale)
        if adaptive_channels < 0 or not math.isfinite(adaptive_span) or adaptive_span <= 0:
            raise ValueError(f"adaptive_channels / adaptive_span: expected >= 0 and > 0, got "
                             f"{adaptive_channels} / {adaptive_span}")
        self.adaptive_span = float(adaptive_span)
        self.data_net: Optional[nn.Sequential] = None
        if adaptive_channels > 0:
            c = int(adaptive_channels)
            last = nn.Conv2d(c, 1, 3, padding=1, padding_mode="reflect")
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)  # type: ignore[arg-type]  # a Conv2d's bias is a tensor
            self.data_net = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                                          nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect"), nn.ReLU(), last)
        specs = check_coarse(coarse)
        self.coarse_factors = [f for f, _, _ in specs]
        self.coarse = nn.ModuleList([_Bank(n, k, n_mixture, 0.1 * penalty_weight, penalty_scale)
                                     for _, n, k in specs])
        self.log_data_weight = nn.Parameter(torch.tensor(math.log(data_weight)))

    @property
    def pad(self) -> int:
        """Reflection padding the callers add: ``kernel_size // 2``, or more so that each coarse bank's
        valid correlation covers the image (``factor * (kernel_size // 2)``)."""
        return max([self.kernel_size // 2] + [f * (b.kernel_size // 2) for b, f in self.banks()])

    def banks(self) -> List[Tuple[_Bank, int]]:
        """``[(bank, pooling factor), ...]``: this fine bank (factor 1) then the coarse banks."""
        fine: List[Tuple[_Bank, int]] = [(self, 1)]
        return fine + [(cast(_Bank, b), f) for b, f in zip(self.coarse, self.coarse_factors)]

    def data_weight(self, y: Tensor) -> Tensor:
        """``lambda``: a 0-d tensor, or the map ``lambda_p(y)`` ``(B, 1, H, W)`` with ``adaptive_channels``."""
        lam = self.log_data_weight.exp()
        if self.data_net is None:
            return lam
        return lam * torch.exp(self.adaptive_span * torch.tanh(self.data_net(y)))

    def forward(self, z: Tensor, y: Tensor) -> Tensor:  # type: ignore[override]
        """Energy per sample, ``(B,)``."""
        prior = _total([bank.penalty(_pool(z, f)) for bank, f in self.banks()])
        return 0.5 * (self.data_weight(y) * (z - y) ** 2).sum(dim=(1, 2, 3)) + prior

    def _prior_grad(self, z: Tensor) -> Tensor:
        size = (z.shape[-2], z.shape[-1])
        return _total([_unpool(bank.prior_grad(_pool(z, f)), f, size) for bank, f in self.banks()])

    def grad(self, z: Tensor, y: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """Exact ``grad_z E(z, y)``, ``(B, 1, H, W)``; differentiable (a node of the graph).

        ``weight``: :meth:`data_weight` ``(y)`` when already computed (a solve computes it once).
        """
        lam = self.data_weight(y) if weight is None else weight
        return lam * (z - y) + self._prior_grad(z)

    def grad_split(self, z: Tensor, y: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """``grad_z E(z, y)`` (same value as :meth:`grad`) with a cheaper graph for implicit layers.

        Its derivative in ``z`` is the analytic Hessian-vector product (:class:`_PriorGradZ`);
        its derivative in the parameters and ``y`` is that of :meth:`grad` at a detached ``z``.
        The two paths add up to the exact first derivative (not to higher ones: use :meth:`grad`
        when a second derivative through the solve is needed).
        """
        if not torch.is_grad_enabled():
            return self.grad(z, y, weight)
        lam = self.data_weight(y) if weight is None else weight
        param_path = self._prior_grad(z.detach())
        return lam * (z - y) + _PriorGradZ.apply(z, self) + (param_path - param_path.detach())

    @torch.no_grad()
    def lipschitz_bound(self, grid: int = 64) -> float:
        """Upper bound ``L`` of the Hessian's largest eigenvalue:
        ``lambda + sum_banks max_w sum_k c_k |w_k^(w)|^2 / f^2`` (with an adaptive data weight,
        its largest value ``lambda exp(span)``).

        ``c_k = max_x phi_k''(x) = sum_m 2 alpha_km / s_km^2``; each bank's ``sum_k c_k w_k^T w_k``
        is a convolution whose spectrum is evaluated on a ``grid x grid`` frequency grid, and the
        average pooling ``D`` of factor ``f`` has ``||D||^2 = 1 / f^2``.
        """
        lam = self.log_data_weight.exp() * (math.exp(self.adaptive_span) if self.data_net is not None else 1.0)
        total = lam + _total([bank.spectral_bound(grid) / float(f * f) for bank, f in self.banks()])
        return float(total)


def add_coarse_banks(
    state: Dict[str, Tensor], coarse: Sequence[Sequence[int]], new_weight: float = 0.1, prefix: str = "energy."
) -> Dict[str, Tensor]:
    """A trained :class:`FoEEnergy` state (under ``prefix``) with coarse banks added.

    Coarse banks already in ``state`` are kept; each missing one gets the lowest DCT atoms of its
    size scaled to the trained fine filters' median norm, the median trained scale and
    ``new_weight`` times the median trained weight, so the energy starts close to the trained one
    and training decides what the new banks become.

    Args:
        state: a state dict holding ``{prefix}weight`` ``(K, 1, k, k)``, ``{prefix}log_alpha``
            and ``{prefix}log_scale`` ``(K, M)``; other entries are copied.
        coarse: the banks of the new energy, each ``(factor, n_filters, kernel_size)``.
        new_weight: the new banks' penalty weight relative to the median trained one.

    Returns:
        A new state dict for ``FoEEnergy(K, k, M, coarse=coarse)``.

    Example:
        >>> small = {"energy." + k: v for k, v in FoEEnergy(4, 3).state_dict().items()}
        >>> grown = add_coarse_banks(small, [(2, 6, 3)])
        >>> tuple(grown["energy.coarse.0.weight"].shape), tuple(grown["energy.coarse.0.log_alpha"].shape)
        ((6, 1, 3, 3), (6, 1))
    """
    specs = check_coarse(coarse)
    if isinstance(new_weight, bool) or not isinstance(new_weight, (int, float)) or not 0 < new_weight < math.inf:
        raise ValueError(f"new_weight: expected a positive number (finite, > 0), got {new_weight!r}")
    w = state[prefix + "weight"]
    log_alpha, log_scale = state[prefix + "log_alpha"], state[prefix + "log_scale"]
    norm = (w - w.mean(dim=(2, 3), keepdim=True)).flatten(1).norm(dim=1).median()
    out = dict(state)
    for i, (_, n, k) in enumerate(specs):
        key = f"{prefix}coarse.{i}."
        if key + "weight" in state:
            continue
        out[key + "weight"] = dct_filters(k, n).to(w) * norm
        out[key + "log_alpha"] = (log_alpha.median(dim=0).values + math.log(new_weight)).expand(n, -1).clone()
        out[key + "log_scale"] = log_scale.median(dim=0).values.expand(n, -1).clone()
    return out


def rescale_energy_state(state: Dict[str, Tensor], ratio: float, prefix: str = "energy.") -> Dict[str, Tensor]:
    """A :class:`FoEEnergy` state with every linear map of the image scaled by ``ratio``.

    The filter banks (fine and coarse) and the data weight network's first layer: the energy
    then sees an image ``ratio`` times brighter, ``E'(z, y) = E(r z, r y)`` up to the data
    weight (which the caller scales by ``r^2``). ``prefix``: the energy's key prefix.
    """
    linear = re.compile(re.escape(prefix) + r"(weight|coarse\.\d+\.weight|data_net\.0\.weight)$")
    return {name: (value * ratio if linear.match(name) else value) for name, value in state.items()}
