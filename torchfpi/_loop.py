"""The per-sample iteration loop that every solver shares, forward and adjoint.

:func:`iterate` calls the map and the solver; everything per sample lives in a :class:`_Book`
(residuals, stopping and freezing, divergence and NaN detection, best iterates, compaction of
the working batch, traces), one method per step of an iteration:

1. :meth:`_Book.measure`: the residual of each working row;
2. :meth:`_Book.observe`: new best images and divergence limits, and which rows stop now;
3. :meth:`_Book.finish`: store the stopped rows' results;
4. :meth:`_Book.advance`: the next working rows (compacted or held still);
5. :meth:`_Book.result`: the final ``(z*, SolveStats)``.

The residual is defined once, in :func:`relative_residual` and :data:`REL_EPS`.
Bookkeeping runs on the host in float64: a handful of tiny array operations per iteration
instead of device kernels, and one device-to-host transfer of two norms per sample.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from torchfpi._solution import DIVERGENCE_FACTOR, SolveStats, Status
from torchfpi.errors import FixedPointError

try:  # numpy makes the per-sample bookkeeping ~5x cheaper; torch alone works too
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is an optional companion of torch
    _np = None  # type: ignore[assignment]

REL_EPS = 1e-9
"""Added to ||f(z)|| in the relative residual ||f(z) - z|| / (||f(z)|| + REL_EPS)."""

Call = Callable[[Tensor, Optional[Tensor]], Tensor]
"""``call(z_work, idx)``: the map on the working rows; ``idx`` their ``(b,)`` original rows or None."""


def relative_residual(fz: Tensor, z: Tensor) -> Tensor:
    r"""Per-sample relative residual ``||f(z) - z|| / (||f(z)|| + 1e-9)``, shape ``(B,)``.

    The convergence measure of :func:`torchfpi.fixed_point` (``residual="relative"``); norms are
    Euclidean over every non-batch dimension.

    Example:
        >>> import torch, torchfpi
        >>> torchfpi.relative_residual(torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 3.0]]))
        tensor([0.2000])
    """
    b = fz.shape[0]
    a = torch.linalg.vector_norm((fz - z).reshape(b, -1), dim=1)
    return a / (torch.linalg.vector_norm(fz.reshape(b, -1), dim=1) + REL_EPS)


def nonfinite_message(what: str, k: int) -> str:
    where = "z0" if k == 0 else f"iteration {k}"
    return (
        f"{what}: the map returned NaN or Inf at {where}; check f for invalid operations "
        "(log of non-positive values, division by zero) or a step size that is too large"
    )


class _HostOps:
    """The few array operations of the bookkeeping, on host (CPU) arrays.

    numpy arrays when numpy is importable (each small op costs ~1 us instead of torch's ~5 us,
    which matters once per iteration), else CPU float64 tensors with the same semantics.
    """

    def __init__(self) -> None:
        self.np = _np is not None

    def host(self, t: Tensor) -> Any:
        h = t.detach().to("cpu", torch.float64)
        return h.numpy() if self.np else h

    def full(self, n: int, value: float, kind: str) -> Any:
        if self.np:
            return _np.full(n, value, dtype={"f": _np.float64, "i": _np.int64, "b": bool}[kind])
        dt = {"f": torch.float64, "i": torch.int64, "b": torch.bool}[kind]
        return torch.full((n,), value, dtype=dt)

    def relative(self, a: Any, nrm: Any) -> Any:
        """``a / (nrm + REL_EPS)`` in float64 (``a``, ``nrm`` may be float32 arrays)."""
        if not self.np:
            return a / (nrm + REL_EPS)
        with _np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # inf/inf -> nan: handled
            return _np.divide(a, _np.add(nrm, REL_EPS, dtype=_np.float64), dtype=_np.float64)

    def fmin(self, a: Any, b: Any) -> Any:
        return _np.fmin(a, b) if self.np else torch.fmin(a, b)

    def scale(self, a: Any, factor: float) -> Any:
        """``a * factor`` in float64 (``a`` may be a float32 array)."""
        return _np.multiply(a, factor, dtype=_np.float64) if self.np else a * factor

    def where(self, m: Any, a: Any, b: Any) -> Any:
        return _np.where(m, a, b) if self.np else torch.where(m, torch.as_tensor(a), torch.as_tensor(b))

    def isfinite(self, a: Any) -> Any:
        return _np.isfinite(a) if self.np else torch.isfinite(a)

    def nonzero(self, m: Any) -> Any:
        return _np.flatnonzero(m) if self.np else m.nonzero().squeeze(1)

    def torch(self, a: Any, device: torch.device, dtype: Optional[torch.dtype] = None) -> Tensor:
        t = torch.from_numpy(a) if self.np else a
        if device.type == "cpu" and (dtype is None or dtype == t.dtype):
            return t  # no dispatch for a no-op move
        return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


_HOST = _HostOps()


class _Book:
    """Per-sample records of one solve; the working rows are ``idx`` (None: all rows)."""

    def __init__(self, z0: Tensor, tol: float, absolute: bool, compact: bool, what: str) -> None:
        H = _HOST
        B = z0.shape[0]
        self.z0, self.tol, self.absolute, self.compact, self.what = z0, tol, absolute, compact, what
        self.device = z0.device
        # On the CPU with numpy, norms are read as arrays without a copy (no stack, no transfer).
        self.direct = H.np and z0.device.type == "cpu" and z0.dtype in (torch.float32, torch.float64)
        self.grad_on = torch.is_grad_enabled()  # unrolled differentiation: norms off the graph
        self.z_out: Optional[Tensor] = None  # allocated at the first stop
        self.res_out = H.full(B, math.nan, "f")
        self.it_out = H.full(B, 0, "i")
        self.st_out = H.full(B, int(Status.MAX_ITER), "i")
        self.traces: list = []
        self.idx: Any = None  # host indices of the working rows (None: all rows)
        self.idx_dev: Optional[Tensor] = None
        self.best_r = H.full(B, math.inf, "f")
        self.best_f = z0
        self.lim = H.full(B, math.inf, "f")  # DIVERGENCE_FACTOR * smallest |residual| so far
        self.active = H.full(B, True, "b")
        self.inactive: Any = None  # ~active once a sample has stopped
        self.n_active = B
        self.all_active = True
        self.held: Any = None  # diverged samples, kept still in the full-batch mode
        self.a: Any = None  # |f(z) - z| per working row
        self.nrm: Any = None  # |f(z)| per working row (None for the absolute residual)
        self.r: Any = None  # the residual per working row

    def measure(self, fz: Tensor, zw: Tensor) -> Any:
        """Step 1: the residual of each working row (float64, host)."""
        H = _HOST
        fzd = fz.detach() if self.grad_on else fz
        diff = fzd - (zw.detach() if self.grad_on else zw)
        if self.direct:
            # ``a`` may stay float32: it is only compared and scaled in float64.
            a = torch.linalg.vector_norm(diff, dim=1).numpy()
            if self.absolute:
                a = r = a.astype(_np.float64)
                nrm = None
            else:
                nrm = torch.linalg.vector_norm(fzd, dim=1).numpy()
                r = H.relative(a, nrm)
        elif self.absolute:
            a = r = H.host(torch.linalg.vector_norm(diff, dim=1))
            nrm = None
        else:
            both = torch.stack([torch.linalg.vector_norm(diff, dim=1), torch.linalg.vector_norm(fzd, dim=1)])
            a, nrm = H.host(both)
            r = H.relative(a, nrm)
        self.a, self.nrm, self.r = a, nrm, r
        return r

    def observe(self, k: int, fz: Tensor, zw: Tensor) -> Optional[Tuple[Any, Any]]:
        """Step 2: update best images and limits; return ``(rows, converged)`` that stop now."""
        H = _HOST
        a, nrm, r = self.a, self.nrm, self.r
        # One test for "nothing happens to any active sample": no stop (r >= tol), no divergence
        # and finite (a < lim; NaN and Inf compare False, lim starts at Inf), and a new best
        # residual (r < best). Only otherwise are the exact event and best-image rules evaluated.
        quiet = (r >= self.tol) & (a < self.lim) & (r < self.best_r)
        if not self.all_active:
            quiet |= self.inactive
        calm = bool(quiet.all())
        best_prev, lim_prev = self.best_r, self.lim
        # Calm: r < best for every active sample, so the new best is r (rows of stopped samples
        # are never read again).
        self.best_r = r if calm else H.fmin(self.best_r, r)
        self.lim = H.fmin(self.lim, H.scale(a, DIVERGENCE_FACTOR))
        self.traces.append((self.idx, r))  # rows of stopped samples are masked out at the end
        if calm:
            self.best_f = fz
            return None
        # An overflowing ||f(z)|| makes r = 0 < tol and is sorted out below.
        hit = r < self.tol
        event = hit | ~(a < lim_prev)
        worse = r >= best_prev
        if not self.all_active:
            event &= self.active
            worse &= self.active
        if k == 1 or not bool(worse.any()):
            self.best_f = fz
        else:
            self.best_f = torch.where(H.torch(worse, self.device).unsqueeze(1), self.best_f, fz)
        if not bool(event.any()):
            return None
        # Norms are >= 0, so a + ||f(z)|| is finite iff both are (barring an overflow of the
        # sum, which only sends the check down the exact path).
        conv = hit
        if bool(H.isfinite(a if nrm is None else a + nrm).all()):
            finished = event & (conv | (a > self.lim))
        else:
            ok = H.isfinite(a) if nrm is None else H.isfinite(a) & H.isfinite(nrm)
            rows = H.torch(H.nonzero(~ok & self.active), self.device)
            if rows.numel() and not (torch.isfinite(fz[rows]).all() and torch.isfinite(zw[rows]).all()):
                raise FixedPointError(nonfinite_message(self.what, k))
            conv = conv & ok
            finished = event & (conv | ~ok | ~(a <= self.lim))
        sel = H.nonzero(finished)
        return (sel, conv) if len(sel) > 0 else None

    def finish(self, k: int, fz: Tensor, stop: Tuple[Any, Any]) -> None:
        """Step 3: store the stopped rows' results (an index copy of those rows only)."""
        H = _HOST
        sel, conv = stop
        csel = conv[sel]
        sel_dev = H.torch(sel, self.device)
        gidx = sel if self.idx is None else self.idx[sel]
        gidx_dev = sel_dev if self.idx is None else H.torch(gidx, self.device)
        if bool(csel.all()):  # the common case: every stopped row converged
            rows = fz.index_select(0, sel_dev)
            self.res_out[gidx] = self.r[sel]
            self.st_out[gidx] = int(Status.CONVERGED)
        else:
            keep_best = H.torch(csel, self.device).unsqueeze(1)
            rows = torch.where(keep_best, fz.index_select(0, sel_dev), self.best_f.index_select(0, sel_dev))
            self.res_out[gidx] = H.where(csel, self.r[sel], self.best_r[sel])
            self.st_out[gidx] = H.where(csel, int(Status.CONVERGED), int(Status.DIVERGED))
            if self.idx is None and not self.compact:
                # Full batch: diverged samples are held still from now on.
                diverged = H.full(len(self.active), False, "b")
                diverged[sel] = ~csel
                self.held = diverged if self.held is None else self.held | diverged
        if self.z_out is None:
            self.z_out = torch.empty_like(self.z0)
        self.z_out.index_copy_(0, gidx_dev, rows)
        self.it_out[gidx] = k
        self.active[sel] = False
        self.inactive = ~self.active
        self.n_active -= len(sel)
        self.all_active = False

    def advance(self, zw: Tensor, z_next: Tensor, state: Any, stopped: bool) -> Tuple[Tensor, Any]:
        """Step 4: the next working iterate and solver state (compacted or held)."""
        H = _HOST
        if stopped and self.compact:
            keep = H.nonzero(self.active)
            keep_dev = H.torch(keep, self.device)
            self.best_f, self.best_r, self.lim = self.best_f[keep_dev], self.best_r[keep], self.lim[keep]
            self.idx = keep if self.idx is None else self.idx[keep]
            self.idx_dev = H.torch(self.idx, self.device)
            self.active = H.full(len(keep), True, "b")
            self.n_active = len(keep)
            self.all_active = True
            return z_next[keep_dev], _select(state, keep_dev)
        if self.held is None:
            return z_next, state
        return torch.where(H.torch(self.held, self.device).unsqueeze(1), zw, z_next), state

    def result(self, k: int) -> Tuple[Tensor, SolveStats]:
        """Step 5: ``(z*, stats)``; rows still running hold their best image."""
        H = _HOST
        B, device = self.z0.shape[0], self.device
        if self.n_active:
            sel = H.nonzero(self.active)
            gidx = sel if self.idx is None else self.idx[sel]
            if self.z_out is None:
                self.z_out = self.best_f  # no sample stopped: every row is its best image
            else:
                self.z_out.index_copy_(0, H.torch(gidx, device), self.best_f.index_select(0, H.torch(sel, device)))
            self.res_out[gidx] = self.best_r[sel]
            self.it_out[gidx] = k
        stats = SolveStats(
            iterations=H.torch(self.it_out, device),
            residual=H.torch(self.res_out, device, self.z0.dtype),
            status=H.torch(self.st_out, device),
            trace=H.torch(self._trace(B), device, self.z0.dtype),
        )
        return self.z_out if self.z_out is not None else self.best_f, stats

    def _trace(self, B: int) -> Any:
        H, traces = _HOST, self.traces
        if H.np and all(tidx is None for tidx, _ in traces):
            trace = _np.stack([tr for _, tr in traces]) if traces else H.full(0, math.nan, "f").reshape(0, B)
        else:
            trace = H.full(len(traces) * B, math.nan, "f").reshape(len(traces), B)
            for t, (tidx, tr) in enumerate(traces):
                if tidx is None:
                    trace[t] = tr
                else:
                    trace[t, tidx] = tr
        if traces and not (self.n_active == B and self.idx is None):
            # NaN after each sample's stop: iteration t + 1 > its iteration count.
            steps = _np.arange(len(traces)) if H.np else torch.arange(len(traces))
            trace[steps[:, None] >= self.it_out[None, :]] = math.nan
        return trace


def _select(state: Any, keep: Tensor) -> Any:
    return {k: (v[keep] if isinstance(v, Tensor) else v) for k, v in state.items()}


def iterate(
    call: Call,
    z0: Tensor,
    *,
    solver: Any,
    tol: float,
    max_iter: int,
    absolute: bool = False,
    compact: bool = False,
    first_fz: Optional[Tensor] = None,
    what: str = "fixed_point",
) -> Tuple[Tensor, SolveStats]:
    """Iterate ``z <- solver.step(state, z, call(z), r)`` per sample until each stops.

    Args:
        call: the map on the working rows (see :data:`Call`).
        z0: ``(B, N)`` initial iterate.
        solver: an object of the solver protocol (see :mod:`torchfpi._solvers`).
        first_fz: the map already evaluated at ``z0`` (saves one call).
        what: the solve's name in error messages.

    Returns:
        ``(z_star, stats)``: ``z_star`` is ``(B, N)``; converged samples hold ``f(z_k)`` at the
        iteration where they converged, the others the best image seen.
    """
    book = _Book(z0, tol, absolute, compact, what)
    zw = z0
    state = None
    k = 0
    for k in range(1, max_iter + 1):
        fz = first_fz if (k == 1 and first_fz is not None) else call(zw, book.idx_dev)
        r = book.measure(fz, zw)
        stop = book.observe(k, fz, zw)
        if stop is not None:
            book.finish(k, fz, stop)
            if book.n_active == 0:
                break
        if state is None:
            state = solver.init(zw, fz)
        z_next = solver.step(state, zw, fz, r)
        zw, state = book.advance(zw, z_next, state, stop is not None)
    return book.result(k)
