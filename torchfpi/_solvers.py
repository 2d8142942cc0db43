"""Forward iteration strategies and the one loop they share.

A solver is a small frozen dataclass with two methods:

* ``init(z, fz) -> state``: a dict of tensors whose dim 0 is the batch (Python scalars allowed);
* ``step(state, z, fz, residual) -> z_next``: the next iterate from the current iterate ``z``, its
  image ``fz = f(z)`` and the per-sample residual.

The loop (:func:`_iterate`) owns everything else: residuals, per-sample stopping and freezing,
divergence and NaN detection, compaction of the working batch, best iterates and traces. Solvers
work on flat states ``(B, N)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from torchfpi._solution import SolveStats, Status
from torchfpi.errors import FixedPointError

State = Dict[str, object]

try:  # numpy makes the per-sample bookkeeping ~5x cheaper; torch alone works too
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is an optional companion of torch
    _np = None

_REL_EPS = 1e-9
"""Added to ||f(z)|| in the relative residual ||f(z) - z|| / (||f(z)|| + eps)."""

DIVERGENCE_FACTOR = 1e6
"""A sample diverges when its absolute residual exceeds this multiple of its smallest one."""


def _check_unit_interval(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 < value <= 1.0):
        raise ValueError(f"{name}: expected a number in (0, 1], got {value!r}")


@dataclass(frozen=True)
class FPI:
    """Plain or damped fixed-point iteration: ``z <- (1 - damping) z + damping f(z)``.

    Args:
        damping: step weight in (0, 1]; ``1`` is the plain iteration z <- f(z). Damping makes a
            map whose Jacobian has eigenvalues with real part < 1 but modulus >= 1 contractive.

    Example:
        >>> import torch, torchfpi
        >>> sol = torchfpi.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 3),
        ...                            solver=torchfpi.FPI(damping=0.8))
        >>> torch.allclose(sol.value, torch.full((2, 3), 2.0))
        True
    """

    damping: float = 1.0

    def __post_init__(self) -> None:
        _check_unit_interval("damping", self.damping)

    def init(self, z: Tensor, fz: Tensor) -> State:
        return {}

    def step(self, state: State, z: Tensor, fz: Tensor, residual: Tensor) -> Tensor:
        if self.damping == 1.0:
            return fz
        return torch.lerp(z, fz, self.damping)


@dataclass(frozen=True)
class Anderson:
    """Anderson acceleration (type II) with a window, regularisation and a safeguard.

    Each step combines the last ``m`` iterates: it finds weights ``alpha`` (summing to one) that
    minimise ``||sum_i alpha_i (f(z_i) - z_i)||^2 + regularization * scale * ||alpha||^2`` (a
    ridge-regularised least squares solved per sample in float64 with ``torch.linalg``) and
    moves to ``sum_i alpha_i [(1 - damping) z_i + damping f(z_i)]``.

    When it helps: like any Krylov-type acceleration, when the Jacobian's spectrum is clustered
    (e.g. real in [0, rho] for gradient-descent maps of ill-conditioned energies, where it cuts
    the iterations several-fold). When the spectrum fills a disc around 0 of radius rho (random
    convolutional DEQ maps), no polynomial acceleration beats z <- f(z) by much: expect ~0.5-0.8
    of FPI's iterations there.

    Safeguards, per sample: if the small system is ill-conditioned (non-finite weights or
    ``sum |alpha| > max_coefficient``) the step falls back to damped FPI; if the residual grows
    above ``restart`` times the best residual so far, the history is cleared (restart), which
    makes the next step a damped FPI step too.

    Args:
        m: window size (number of past iterates), at least 1 (``m=1`` is damped FPI).
        regularization: ridge weight relative to the mean diagonal of the Gram matrix, >= 0.
        damping: mixing weight in (0, 1].
        restart: residual growth factor (> 1) that triggers a restart.
        max_coefficient: largest allowed ``sum |alpha|`` before falling back to FPI.

    Example:
        >>> import torch, torchfpi
        >>> A = 0.95 * torch.eye(4)
        >>> sol = torchfpi.fixed_point(lambda z: z @ A + 1, torch.zeros(3, 4),
        ...                            solver=torchfpi.Anderson(m=5), tol=1e-8, max_iter=50)
        >>> bool(sol.converged.all()), torch.allclose(sol.value, torch.full((3, 4), 20.0))
        (True, True)
    """

    m: int = 5
    regularization: float = 1e-8
    damping: float = 1.0
    restart: float = 10.0
    max_coefficient: float = 1e4

    def __post_init__(self) -> None:
        if not isinstance(self.m, int) or isinstance(self.m, bool) or self.m < 1:
            raise ValueError(f"m: expected an integer >= 1, got {self.m!r}")
        if not (isinstance(self.regularization, (int, float)) and self.regularization >= 0):
            raise ValueError(f"regularization: expected a number >= 0, got {self.regularization!r}")
        _check_unit_interval("damping", self.damping)
        if not (isinstance(self.restart, (int, float)) and self.restart > 1):
            raise ValueError(f"restart: expected a number > 1, got {self.restart!r}")
        if not (isinstance(self.max_coefficient, (int, float)) and self.max_coefficient > 1):
            raise ValueError(f"max_coefficient: expected a number > 1, got {self.max_coefficient!r}")

    def init(self, z: Tensor, fz: Tensor) -> State:
        b, n = z.shape
        m = self.m
        return {
            "F": z.new_zeros(b, m, n),  # past images f(z_i)
            "G": z.new_zeros(b, m, n),  # past residuals f(z_i) - z_i
            "H": torch.zeros(b, m, m, dtype=torch.float64, device=z.device),  # Gram of G
            "valid": torch.zeros(b, m, dtype=torch.bool, device=z.device),
            "best": torch.full((b,), math.inf, dtype=torch.float64, device=z.device),
            "ptr": 0,
        }

    def step(self, state: State, z: Tensor, fz: Tensor, residual: Tensor) -> Tensor:
        F: Tensor = state["F"]  # type: ignore[assignment]
        G: Tensor = state["G"]  # type: ignore[assignment]
        H: Tensor = state["H"]  # type: ignore[assignment]
        valid: Tensor = state["valid"]  # type: ignore[assignment]
        best: Tensor = state["best"]  # type: ignore[assignment]
        ptr: int = state["ptr"]  # type: ignore[assignment]
        m = self.m
        g = fz - z
        res64 = torch.as_tensor(residual, dtype=torch.float64).to(z.device)
        # Restart where the residual blew up relative to the best one seen.
        restart = res64 > self.restart * best
        best = torch.minimum(best, torch.nan_to_num(res64, nan=math.inf))
        if torch.is_grad_enabled():
            # Unrolled differentiation records this step: keep the history functional.
            F, G, H, valid = F.clone(), G.clone(), H.clone(), valid.clone()
        valid.masked_fill_(restart.unsqueeze(1), False)
        F[:, ptr] = fz
        G[:, ptr] = g
        valid[:, ptr] = True
        # (B, m): <G_i, g>. A broadcast multiply-sum beats bmm's batched mat-vec on CPU.
        row = (G * g.unsqueeze(1)).sum(2).to(torch.float64)
        H[:, ptr, :] = row
        H[:, :, ptr] = row
        both = valid.unsqueeze(2) & valid.unsqueeze(1)
        Hm = torch.where(both, H, torch.zeros((), dtype=H.dtype, device=H.device))
        diag = torch.diagonal(Hm, dim1=1, dim2=2)
        n_valid = valid.sum(1).clamp_min(1)
        scale = diag.sum(1) / n_valid
        ridge = self.regularization * scale + torch.finfo(torch.float64).tiny
        eye = torch.eye(m, dtype=H.dtype, device=H.device)
        # Invalid slots get an identity row so the system stays regular; their weight is zeroed.
        pad = torch.where(valid, ridge.unsqueeze(1), torch.ones((), dtype=H.dtype, device=H.device))
        system = Hm + eye * pad.unsqueeze(2)
        rhs = valid.to(H.dtype).unsqueeze(2)
        sol, _ = torch.linalg.solve_ex(system, rhs)
        a = sol.squeeze(2) * valid
        total = a.sum(1, keepdim=True)
        alpha = a / total
        bad = ~torch.isfinite(alpha).all(1) | (alpha.abs().sum(1) > self.max_coefficient)
        alpha = torch.where(bad.unsqueeze(1), torch.zeros((), dtype=alpha.dtype, device=alpha.device), alpha)
        alpha = alpha.to(z.dtype).unsqueeze(1)  # (B, 1, m)
        mix_f = torch.bmm(alpha, F).squeeze(1)
        if self.damping == 1.0:
            z_next = mix_f
        else:
            mix_g = torch.bmm(alpha, G).squeeze(1)
            z_next = mix_f - (1.0 - self.damping) * mix_g
        fallback = z + self.damping * g
        z_next = torch.where(bad.unsqueeze(1), fallback, z_next)
        state.update(F=F, G=G, H=H, valid=valid, best=best, ptr=(ptr + 1) % m)
        return z_next


def _select(state: State, keep: Tensor) -> State:
    return {k: (v[keep] if isinstance(v, Tensor) else v) for k, v in state.items()}


def _nonfinite_message(what: str, k: int) -> str:
    where = "z0" if k == 0 else f"iteration {k}"
    return (
        f"{what}: the map returned NaN or Inf at {where}; check f for invalid operations "
        "(log of non-positive values, division by zero) or a step size that is too large"
    )


class _HostOps:
    """The few array operations of the loop's bookkeeping, on host (CPU) arrays.

    numpy arrays when numpy is importable (each small op costs ~1 us instead of torch's ~5 us,
    which matters once per iteration), else CPU float64 tensors with the same semantics.
    """

    def __init__(self) -> None:
        self.np = _np is not None

    def host(self, t: Tensor):  # noqa: ANN201
        h = t.detach().to("cpu", torch.float64)
        return h.numpy() if self.np else h

    def full(self, n: int, value: float, kind: str):  # noqa: ANN201
        if self.np:
            return _np.full(n, value, dtype={"f": _np.float64, "i": _np.int64, "b": bool}[kind])
        dt = {"f": torch.float64, "i": torch.int64, "b": torch.bool}[kind]
        return torch.full((n,), value, dtype=dt)

    def divide(self, a, b):  # noqa: ANN001, ANN201
        if not self.np:
            return a / b
        with _np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            return a / b  # inf / inf -> nan is expected and handled

    def fmin(self, a, b):  # noqa: ANN001, ANN201
        return _np.fmin(a, b) if self.np else torch.fmin(a, b)

    def scale(self, a, factor: float):  # noqa: ANN001, ANN201
        """``a * factor`` in float64 (``a`` may be a float32 array)."""
        return _np.multiply(a, factor, dtype=_np.float64) if self.np else a * factor

    def where(self, m, a, b):  # noqa: ANN001, ANN201
        if self.np:
            return _np.where(m, a, b)
        return torch.where(m, torch.as_tensor(a), torch.as_tensor(b))

    def isfinite(self, a):  # noqa: ANN001, ANN201
        return _np.isfinite(a) if self.np else torch.isfinite(a)

    def isnan(self, a):  # noqa: ANN001, ANN201
        return _np.isnan(a) if self.np else torch.isnan(a)

    def nonzero(self, m):  # noqa: ANN001, ANN201
        return _np.flatnonzero(m) if self.np else m.nonzero().squeeze(1)

    def torch(self, a, device: torch.device, dtype: Optional[torch.dtype] = None) -> Tensor:  # noqa: ANN001
        t = torch.from_numpy(a) if self.np else a
        if device.type == "cpu" and (dtype is None or dtype == t.dtype):
            return t  # no dispatch for a no-op move
        return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


_HOST = _HostOps()


def _iterate(
    call: Callable[[Tensor, Optional[Tensor]], Tensor],
    z0: Tensor,
    *,
    solver: object,
    tol: float,
    max_iter: int,
    absolute: bool = False,
    compact: bool = False,
    first_fz: Optional[Tensor] = None,
    what: str = "fixed_point",
) -> Tuple[Tensor, SolveStats]:
    """Iterate ``z <- solver.step(z, call(z))`` per sample until each converges or diverges.

    Args:
        call: ``call(z_work, idx)`` evaluates the map on the working rows; ``idx`` is ``None``
            while the working batch is the full batch, else the ``(b,)`` original row indices.
        z0: ``(B, N)`` initial iterate.
        first_fz: the map already evaluated at ``z0`` (saves one call).

    Returns:
        ``(z_star, stats)``: ``z_star`` is ``(B, N)``; converged samples hold ``f(z_k)`` at the
        iteration where they converged, the others the best image seen.
    """
    # Per-sample bookkeeping lives on the host in float64: a handful of tiny array ops per
    # iteration instead of device kernels, and one device-to-host transfer of two norms per sample.
    H = _HOST
    B = z0.shape[0]
    device = z0.device
    dtype = z0.dtype
    # On the CPU with numpy, the norms are read as arrays without a copy (no stack, no transfer).
    direct = H.np and device.type == "cpu" and dtype in (torch.float32, torch.float64)
    grad_on = torch.is_grad_enabled()  # unrolled differentiation: keep the norms off the graph
    z_out: Optional[Tensor] = None  # allocated at the first stop
    res_out = H.full(B, math.nan, "f")
    it_out = H.full(B, 0, "i")
    st_out = H.full(B, int(Status.MAX_ITER), "i")
    traces = []
    idx = None  # host indices of the working rows (None: all rows)
    idx_dev: Optional[Tensor] = None
    zw = z0
    best_r = H.full(B, math.inf, "f")
    best_f = z0
    lim = H.full(B, math.inf, "f")  # DIVERGENCE_FACTOR * smallest |residual| so far
    active = H.full(B, True, "b")
    inactive = None  # ~active once a sample has stopped
    n_active = B
    all_active = True
    held = None  # diverged samples, kept still in the full-batch mode
    state: Optional[State] = None
    conv = None
    k = 0
    for k in range(1, max_iter + 1):
        fz = first_fz if (k == 1 and first_fz is not None) else call(zw, idx_dev)
        fzd = fz.detach() if grad_on else fz
        diff = fzd - (zw.detach() if grad_on else zw)
        if direct:
            # Norms read in place; the float64 residual in one numpy call (same values as
            # converting first). ``a`` may stay float32: it is only compared and scaled in float64.
            a = torch.linalg.vector_norm(diff, dim=1).numpy()
            if absolute:
                a = r = a.astype(_np.float64)
                nrm = None
            else:
                nrm = torch.linalg.vector_norm(fzd, dim=1).numpy()
                with _np.errstate(invalid="ignore", over="ignore"):  # inf / inf -> nan: handled below
                    r = _np.divide(a, _np.add(nrm, _REL_EPS, dtype=_np.float64), dtype=_np.float64)
        elif absolute:
            a = r = H.host(torch.linalg.vector_norm(diff, dim=1))
            nrm = None
        else:
            both = H.host(torch.stack([torch.linalg.vector_norm(diff, dim=1), torch.linalg.vector_norm(fzd, dim=1)]))
            a, nrm = both[0], both[1]
            r = H.divide(a, nrm + _REL_EPS)
        # One test for "nothing happens to any active sample": no stop (r >= tol), no divergence
        # and finite (a < lim; NaN and Inf compare False, lim starts at Inf), and a new best
        # residual (r < best). Only otherwise are the exact event and best-image rules evaluated.
        quiet = (r >= tol) & (a < lim) & (r < best_r)
        if not all_active:
            quiet |= inactive
        calm = bool(quiet.all())
        best_prev, lim_prev = best_r, lim
        # Calm: r < best for every active sample, so the new best is r (rows of stopped samples
        # are never read again).
        best_r = r if calm else H.fmin(best_r, r)
        lim = H.fmin(lim, H.scale(a, DIVERGENCE_FACTOR))
        traces.append((idx, r))  # rows of stopped samples are masked out at the end
        if calm:
            best_f = fz
            event = None
        else:
            # An overflowing ||f(z)|| makes r = 0 < tol and is sorted out below.
            hit = r < tol
            event = hit | ~(a < lim_prev)
            worse = r >= best_prev
            if not all_active:
                event &= active
                worse &= active
            if k == 1 or not bool(worse.any()):
                best_f = fz
            else:
                best_f = torch.where(H.torch(worse, device).unsqueeze(1), best_f, fz)
        any_finished = False
        if event is not None and bool(event.any()):
            # Norms are >= 0, so a + ||f(z)|| is finite iff both are (barring an overflow of the
            # sum, which only sends the check down the exact path).
            conv = hit
            if bool(H.isfinite(a if nrm is None else a + nrm).all()):
                finished = event & (conv | (a > lim))
            else:
                ok = H.isfinite(a) if nrm is None else H.isfinite(a) & H.isfinite(nrm)
                rows = H.torch(H.nonzero(~ok & active), device)
                if rows.numel() and not (torch.isfinite(fz[rows]).all() and torch.isfinite(zw[rows]).all()):
                    raise FixedPointError(_nonfinite_message(what, k))
                conv = conv & ok
                finished = event & (conv | ~ok | ~(a <= lim))
            sel = H.nonzero(finished)
            any_finished = len(sel) > 0
        if any_finished:
            # Store the finished rows' results (an index copy of those rows only) and their
            # per-sample records; the common case is that all of them converged.
            csel = conv[sel]
            all_conv = bool(csel.all())
            sel_dev = H.torch(sel, device)
            if idx is None:
                gidx, gidx_dev = sel, sel_dev
            else:
                gidx = idx[sel]
                gidx_dev = H.torch(gidx, device)
            if all_conv:
                rows = fz.index_select(0, sel_dev)
                res_out[gidx] = r[sel]
                st_out[gidx] = int(Status.CONVERGED)
            else:
                rows = torch.where(H.torch(csel, device).unsqueeze(1), fz.index_select(0, sel_dev), best_f.index_select(0, sel_dev))
                res_out[gidx] = H.where(csel, r[sel], best_r[sel])
                st_out[gidx] = H.where(csel, int(Status.CONVERGED), int(Status.DIVERGED))
                if idx is None and not compact:
                    # Full batch: diverged samples are held still from now on.
                    diverged = finished & ~conv
                    held = diverged if held is None else held | diverged
            if z_out is None:
                z_out = torch.empty_like(z0)
            z_out.index_copy_(0, gidx_dev, rows)
            it_out[gidx] = k
            active[sel] = False
            inactive = ~active
            n_active -= len(sel)
            all_active = False
            if n_active == 0:
                break
        if state is None:
            state = solver.init(zw, fz)  # type: ignore[attr-defined]
        z_next = solver.step(state, zw, fz, r)  # type: ignore[attr-defined]
        if any_finished and compact:
            keep = H.nonzero(active)
            keep_dev = H.torch(keep, device)
            zw = z_next[keep_dev]
            state = _select(state, keep_dev)
            best_f, best_r, lim = best_f[keep_dev], best_r[keep], lim[keep]
            idx = keep if idx is None else idx[keep]
            idx_dev = H.torch(idx, device)
            active = H.full(len(keep), True, "b")
            n_active = len(keep)
            all_active = True
        elif held is None:
            zw = z_next
        else:
            zw = torch.where(H.torch(held, device).unsqueeze(1), zw, z_next)
    else:
        k = max_iter
    if n_active:
        sel = H.nonzero(active)
        gidx = sel if idx is None else idx[sel]
        if z_out is None:
            z_out = best_f  # no sample stopped: every row is its best image
        else:
            z_out.index_copy_(0, H.torch(gidx, device), best_f.index_select(0, H.torch(sel, device)))
        res_out[gidx] = best_r[sel]
        it_out[gidx] = k
    if H.np and all(tidx is None for tidx, _ in traces):
        trace = _np.stack([tr for _, tr in traces]) if traces else H.full(0, math.nan, "f").reshape(0, B)
    else:
        trace = H.full(len(traces) * B, math.nan, "f").reshape(len(traces), B)
        for t, (tidx, tr) in enumerate(traces):
            if tidx is None:
                trace[t] = tr
            else:
                trace[t, tidx] = tr
    if traces and not (n_active == B and idx is None):
        # NaN after each sample's stop: iteration t + 1 > its iteration count.
        steps = _np.arange(len(traces)) if H.np else torch.arange(len(traces))
        trace[steps[:, None] >= it_out[None, :]] = math.nan
    stats = SolveStats(
        iterations=H.torch(it_out, device),
        residual=H.torch(res_out, device, dtype),
        status=H.torch(st_out, device),
        trace=H.torch(trace, device, dtype),
    )
    return z_out, stats
