"""Per-sample bookkeeping of the loop: :class:`_Book` replays a window of residual norms.

See :mod:`torchfpi._loop` for the convergence test it implements; the constants below are its
parameters (tests change them with ``monkeypatch``).
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from torchfpi import _host
from torchfpi._host import _gather_rows, _np
from torchfpi._solution import DIVERGENCE_FACTOR, SolveStats, Status
from torchfpi.errors import FixedPointError

REL_EPS = 1e-9
"""Scale-relative floor of the relative residual's denominator (see :func:`relative_residual`)."""

CONTRACTION = 0.999
"""A converging sample's absolute residual must shrink by this factor at the stopping iteration."""

WINDOW_BYTES = 4 << 20
"""Memory for the images kept between two host reads (the window is at most this many bytes)."""

MAX_WINDOW = 16

KEEP_IMAGES = 3
"""Plain FPI on a large state keeps only its newest images of a window (and the window's first
iterate): the others are dropped at once, so f's outputs reuse warm memory instead of fresh
pages. An image the window's replay needs after all (a sample that stopped, or found its best
image, earlier in the window) is recomputed by re-running the window from its first iterate: the
same calls of f on the same values, holding no more than the images it returns."""

DEFER_ELEMENTS = 4096
"""States with at most this many entries (batch included) take their norms once per window."""
"""Longest window (iterations between two host reads)."""


def nonfinite_message(what: str, k: int) -> str:
    where = "z0" if k == 0 else f"iteration {k}"
    return (
        f"{what}: the map returned NaN or Inf at {where}; check f for invalid operations "
        "(log of non-positive values, division by zero) or a step size that is too large"
    )


def _window_limit(z0: Tensor, images_per_step: int) -> int:
    per_image = max(1, z0.numel() * z0.element_size() * images_per_step)
    return max(1, min(MAX_WINDOW, WINDOW_BYTES // per_image))


class _Book:
    """Per-sample records of one solve; the working rows are ``idx`` (None: all rows)."""

    def __init__(self, z0: Tensor, tol: float, absolute: bool, compact: bool, what: str, fpi: bool) -> None:
        H = _host._HOST
        B = z0.shape[0]
        self.z0, self.tol, self.absolute, self.compact, self.what = z0, tol, absolute, compact, what
        self.device = z0.device
        self.grad_on = torch.is_grad_enabled()  # unrolled differentiation: norms off the graph
        self.limit = _window_limit(z0, 1 if fpi else 2)  # FPI's iterates are its images
        self.z_out: Optional[Tensor] = None  # allocated at the first stop
        self.res_out = H.full(B, math.nan, "f")
        self.it_out = H.full(B, 0, "i")
        self.st_out = H.full(B, int(Status.MAX_ITER), "i")
        self.traces: list = []  # (idx, (w, b) residuals) per window
        self.idx: Any = None  # host indices of the working rows (None: all rows)
        self.idx_dev: Optional[Tensor] = None
        self.best_a = H.full(B, math.inf, "f")  # smallest absolute residual so far
        self.best_r = H.full(B, math.nan, "f")  # the residual at that iterate
        self.best_f: Optional[Tensor] = None  # its image
        self.best_own = False  # best_f is a buffer of the book's own (not one of the images)
        self.min_a = H.full(B, math.nan, "f")  # for the divergence limit
        self.last_a = H.full(B, math.nan, "f")  # a at the previous iteration
        self.active = H.full(B, True, "b")
        self.n_active = B
        self.held: Optional[Tensor] = None  # diverged samples, kept still in the full-batch mode
        self.floor_dev: Optional[Tensor] = None  # the relative residual's floor on the device (want_r)
        self.floor: Any = None  # ... on the host: REL_EPS max(||z0||, ||f(z0)||), at least tiny
        self.z0n: Optional[Tensor] = None  # ||z0|| per row, until the first host read
        self.a_list: List[Tensor] = []  # the window: ||f(z) - z|| per iteration
        self.n_list: List[Tensor] = []  # ... ||f(z)|| (relative residual)
        self.images: List[Tensor] = []  # ... the images f(z)
        self.iterates: List[Tensor] = []  # ... and the iterates z (for FPI: the previous images)
        # Norms are computed in the state's dtype; below this a float32 norm may have lost
        # its squares to underflow, and the window's norms are recomputed in float64.
        self.tiny = torch.finfo(z0.dtype).tiny
        self.underflow = math.sqrt(self.tiny) * 1e4
        self.diff: Optional[Tensor] = None  # f(z) - z
        self.window = min(2, self.limit)  # the first window: two iterations give a first contraction rate
        # A small state (every sample at most DEFER_ELEMENTS entries in all) costs per call, not
        # per entry: its norms are taken once per window on the stacked images and iterates
        # (the same per-row reductions, bit for bit), instead of three calls per iteration.
        self.defer = not self.grad_on and z0.dim() == 2 and z0.numel() <= DEFER_ELEMENTS
        self.k0 = 0  # iterations before the window
        self.batch_stop = False  # stop="batch": the batch stops at once (set by the loop)
        self.keep = 0  # > 0: keep only the newest `keep` images of a window (see KEEP_IMAGES)
        self.call: Any = None  # the loop's map and FPI damping, for a window's replay
        self.damping = 1.0
        self.win_held: Optional[Tensor] = None  # held rows and working rows during the window
        self.win_idx: Optional[Tensor] = None
        self.cursor: Any = None  # where the window's last replay ended: (j + 1, z_{j+1}, image j)
        self.win_buf: Optional[Tensor] = None  # the window's stacked norms buffer (small states)

    # -- every iteration: device work only -----------------------------------------------
    def measure(self, fz: Tensor, zw: Tensor, want_r: bool) -> Optional[Tensor]:
        """Norms of this iteration (kept on the device); the residual if the solver wants it."""
        if not self.images:
            self.win_held, self.win_idx = self.held, self.idx_dev
            self.cursor = self.win_buf = None
        self.images.append(fz)  # with its graph when the loop is recorded (unroll)
        self.iterates.append(zw)
        if self.keep and len(self.images) > self.keep:
            # Drop the image before the newest `keep` and the iterate made from it (plain FPI:
            # the same tensor); the window's first iterate stays, a replay starts there.
            i = len(self.images) - self.keep - 1
            self.images[i] = None  # type: ignore[call-overload]
            self.iterates[i + 1] = None  # type: ignore[call-overload]
            if i:
                self.iterates[i] = None  # type: ignore[call-overload]
        if self.defer and not want_r:
            return None  # small states: the window's norms in a few calls at check()
        if self.grad_on:
            fz, zw = fz.detach(), zw.detach()
        diff = self.diff
        if diff is None or diff.shape != fz.shape:
            diff = self.diff = torch.empty_like(fz)
        # States are flat (B, N). The difference goes into a reused buffer: a fresh one of a
        # few hundred KiB costs page faults, more than the subtraction.
        torch.sub(fz, zw, out=diff)
        a = torch.linalg.vector_norm(diff, dim=1)
        self.a_list.append(a)
        if self.absolute:
            return a if want_r else None
        n = torch.linalg.vector_norm(fz, dim=1)
        self.n_list.append(n)
        if self.floor is None and self.z0n is None:
            self.z0n = torch.linalg.vector_norm(zw, dim=1)  # read with the first window
        if not want_r:
            return None
        if self.floor_dev is None:  # the device floor, for the solver's residual only
            z0n = self.z0n if self.z0n is not None else torch.linalg.vector_norm(zw, dim=1)
            self.floor_dev = (REL_EPS * torch.maximum(z0n, n)).clamp_min(self.tiny)
        return a / torch.maximum(n, self.floor_dev)

    def replay_with(self, call: Any, damping: float, keep: int) -> None:
        """Keep only the newest ``keep`` images of a window (plain or damped FPI, see
        :data:`KEEP_IMAGES`); ``call`` and ``damping`` re-run the window when needed."""
        self.call, self.damping, self.keep = call, damping, keep

    def _img(self, j: int) -> Tensor:
        """Image ``j`` of the window; a dropped one is recomputed (see :meth:`_replay`)."""
        img = self.images[j]
        if img is not None:
            return img
        if self.cursor is not None and self.cursor[0] == j + 1 and self.cursor[2] is not None:
            return self.cursor[2]  # asked again (a stop's finiteness test, then its gather)
        return self._replay(j)

    def _replay(self, j: int) -> Tensor:
        """Re-run the window up to its image ``j``, as the loop ran it, and return that image.

        Starts at the newest kept iterate at or before ``j`` (or where the previous replay of
        this window ended, when that is nearer), and keeps nothing but its position: images
        asked for in increasing order cost one pass over the window in all, and a replay holds
        at most three states (memory stays bounded by :data:`KEEP_IMAGES`, not by the window)."""
        i = j
        while self.iterates[i] is None:
            i -= 1
        z = self.iterates[i]
        if self.cursor is not None and i < self.cursor[0] <= j:
            i, z = self.cursor[0], self.cursor[1]
        fz = z
        for t in range(i, j + 1):
            kept = self.images[t]
            fz = kept if kept is not None else self.call(z, self.win_idx)
            zn = fz if self.damping == 1.0 else torch.lerp(z, fz, self.damping)
            z = zn if self.win_held is None else torch.where(self.win_held, z, zn)
            if t < j and self.iterates[t + 1] is not None:
                z = self.iterates[t + 1]  # the loop's own iterate (the same values)
        self.cursor = (j + 1, z, fz)
        return fz

    def _iterate(self, j: int) -> Tensor:
        """Iterate ``j`` of the window (the input of image ``j``), recomputed if dropped."""
        z = self.iterates[j]
        if z is not None:
            return z
        if j == 0:
            raise RuntimeError("the window's first iterate is always kept")
        if self.cursor is not None and self.cursor[0] == j:
            return self.cursor[1]
        self._replay(j - 1)
        return self.cursor[1]  # type: ignore[index]

    def feed(self, iterates: List[Tensor], images: List[Tensor], a: List[Tensor], n: Optional[List[Tensor]]) -> None:
        """A window computed elsewhere (a replayed CUDA graph): its iterates, images and norms."""
        self.iterates, self.images = iterates, images
        self.a_list, self.n_list = a, ([] if n is None else n)
        if not self.absolute and self.floor is None and self.z0n is None:
            self.z0n = torch.linalg.vector_norm(iterates[0], dim=1)

    def _window_norms(self, first: bool) -> Tensor:
        """The deferred norms of the window (see ``defer``): ``(w, b)`` absolute residuals, then
        (relative residual) ``||z||`` of the window's first iterate and the ``w`` image norms.

        One buffer ``[f(z) - z | z_first | f(z)]`` and one norm call: the same per-row reductions
        as :meth:`measure`'s, bit for bit.
        """
        its, ims = self.iterates, self.images
        w = len(ims)
        buf = torch.empty((2 * w + 1,) + tuple(ims[0].shape), dtype=ims[0].dtype, device=ims[0].device)
        if all(its[j] is ims[j - 1] for j in range(1, w)):
            # Plain FPI: each iterate is the previous image, so one stack holds both.
            torch.stack([its[0]] + ims, out=buf[w:])
            torch.sub(buf[w + 1:], buf[w : 2 * w], out=buf[:w])
        else:
            torch.stack(ims, out=buf[w + 1:])
            buf[w].copy_(its[0])
            torch.sub(buf[w + 1:], torch.stack(its), out=buf[:w])
        self.win_buf = buf  # image j is buf[w + 1 + j]: the last window's gather reads it there
        return torch.linalg.vector_norm(buf[:w] if self.absolute else buf, dim=2)

    # -- once per window: one host read, the replay ----------------------------------------
    def check(self, k: int) -> Optional[int]:
        """Replay the window ending at iteration ``k``; return the rows stopped (or None)."""
        H = _host._HOST
        w = len(self.images)
        first = self.floor is None and not self.absolute
        if len(self.a_list) < w:
            h = H.host(self._window_norms(first))
        elif self.absolute:
            h = H.host(torch.stack(self.a_list))
        else:
            # The window's first ||z|| rides along in the first window (later, any row of the
            # same shape fills its place: the layout of the deferred norms').
            mid = self.z0n if first and self.z0n is not None else self.a_list[0]
            h = H.host(torch.stack(self.a_list + [mid] + self.n_list))
        a = h[:w]
        n = None if self.absolute else h[w + 1:]
        if first:
            # max(||z0||, ||f(z0)||) per sample, in float64 on the host (see relative_residual)
            self.floor = H.fmax(REL_EPS * H.fmax(h[w], n[0]), self.tiny)  # type: ignore[index]
            self.z0n = None
        low = a if n is None else n
        if not bool(low.min() >= self.underflow) and H.fmin_all(low) < self.underflow:  # (NaN: rare)
            a, n = self._exact_norms(a, n, first)
        allfin = math.isfinite(float(h.sum()))  # every norm finite (an overflowing sum: tested exactly)
        if n is None:
            r = a
        elif allfin or not H.np:
            r = a / H.fmax(n, self.floor)
        else:
            with _np.errstate(invalid="ignore", divide="ignore"):  # inf / inf: handled below
                r = a / H.fmax(n, self.floor)
        fin = None
        if not allfin:
            fin = H.isfinite(a) if n is None else H.isfinite(a) & H.isfinite(n)
            allfin = bool(fin.all())
        self.traces.append((self.idx, r))
        self.k0 = k - w
        if allfin and self._quiet(a, r):
            return None
        if allfin and self.z_out is None and self.idx is None and self.n_active == len(self.active):
            # The usual last window: every sample converges in it, nothing diverged before.
            if self._no_divergence(a):
                prev = H.cat0(self.last_a[None], a[:-1])  # NaN before the first iteration
                conv = (r < self.tol) & (a <= H.fmax(prev * CONTRACTION, 0.0))  # (a == 0 passes)
                if bool(conv.any(0).all()):
                    return self._all_converged(H.argmax0(conv), r)
        if fin is None:
            fin = H.full(a.size if H.np else a.numel(), True, "b").reshape(a.shape)
        # Divergence: a above DIVERGENCE_FACTOR x its smallest value before (NaN counts).
        runmin = H.cummin0(H.cat0(self.min_a[None], a))
        lim = runmin[:-1] * DIVERGENCE_FACTOR
        div = ~(a <= lim)
        if k - w == 0:  # the first iteration has no limit yet
            div[0] = ~fin[0]
        prev = H.cat0(self.last_a[None], a[:-1])
        shrink = (a == 0) | (a <= prev * CONTRACTION)
        conv = (r < self.tol) & shrink & fin
        event = conv | div | ~fin
        if self.n_active < len(self.active):
            event &= self.active[None]
        stopped = None
        has = event.any(0)
        last = w - 1
        if bool(has.any()):
            jstop = H.argmax0(event)
            if self.z_out is None and self.n_active == len(self.active) and self.idx is None and bool(has.all()):
                if bool(H.take0(conv, jstop).all()):
                    return self._all_converged(jstop, r)
            jlast = H.where(has, jstop, last)
        else:
            jstop, jlast = None, None
        # Best image by absolute residual among the iterations up to each sample's stop.
        a_best = H.where(H.isfinite(a), a, math.inf)
        if jlast is not None:
            steps = _np.arange(w)[:, None] if H.np else torch.arange(w)[:, None]
            a_best = H.where(steps <= jlast[None], a_best, math.inf)
            if bool((~fin).any()):  # an event at a non-finite norm: not a best candidate
                a_best = H.where(fin, a_best, math.inf)
        jb = H.argmin0(a_best)
        cand = H.take0(a_best, jb)
        better = cand < self.best_a
        if self.n_active < len(self.active):
            better &= self.active
        if jstop is not None:  # a sample that converges needs no best image
            better &= ~(has & H.take0(conv, jstop))
        self._update_best(jb, better, cand, H.take0(r, jb), last)
        if jstop is not None:
            stopped = self._stop(k, has, jstop, conv, fin, r)
            if self.batch_stop and self.n_active == 0:
                self._batch_finish(int(jstop[has].max()), r)
        self.min_a = runmin[-1]
        self.last_a = a[-1]
        self._plan(r, a)
        self.a_list, self.n_list, self.images, self.iterates = [], [], [], []
        return stopped

    def _all_converged(self, js: Any, r: Any) -> Any:
        """Every sample converged in this window (the common last window): gather the images."""
        H = _host._HOST
        lo, hi = int(js.min()), int(js.max())
        if self.batch_stop:  # every sample holds the image where the last one converged
            js, lo = js * 0 + hi, hi
        if lo == hi:
            self.z_out = self._img(lo)
        elif self.win_buf is not None:  # a small state: the images are stacked already, one gather
            w, B = len(self.images), len(js)
            rows = (js + (w + 1)) * B + (_np.arange(B) if H.np else torch.arange(B))  # flat row numbers
            self.z_out = self.win_buf.view(-1, self.win_buf.shape[-1]).index_select(0, H.torch(rows, self.device))
        else:
            self.z_out = _gather_rows(self._img, js, self.device, lo, hi)
        self.it_out[:] = js + (self.k0 + 1)
        self.res_out[:] = H.take0(r, js)
        self.st_out[:] = int(Status.CONVERGED)
        self.active[:] = False
        self.n_active = 0
        self.a_list, self.n_list, self.images, self.iterates = [], [], [], []
        return self.it_out  # not None: the loop stops (no rows left)

    def _batch_finish(self, j: int, r: Any) -> None:
        """``stop="batch"``: the converged samples take the window's image ``j`` (where the last
        one converged), its iteration and residual; diverged samples keep their own results."""
        H = _host._HOST
        conv = self.st_out == int(Status.CONVERGED)
        img = self._img(j)
        if bool(conv.all()):
            self.z_out = img
        else:
            rows = H.torch(H.nonzero(conv), self.device)
            self.z_out.index_copy_(0, rows, img.index_select(0, rows))  # type: ignore[union-attr]
        self.it_out[conv] = self.k0 + j + 1
        self.res_out[conv] = r[j][conv]

    def _best(self) -> Tensor:
        """The best images of the working rows (z0's rows before any finite residual)."""
        if self.best_f is not None:
            return self.best_f
        return self.z0 if self.idx_dev is None else self.z0.index_select(0, self.idx_dev)

    def _quiet(self, a: Any, r: Any) -> bool:
        """The common window: no active sample met ``tol``, nothing diverged (every norm is
        finite: the caller checked), and (usually) every sample's newest image is its best.
        A few array operations in all."""
        H = _host._HOST
        if self.n_active < len(self.active):
            if bool((r[:, self.active] < self.tol).any()):
                return False
        elif bool(r.min() < self.tol):
            return False
        if not self._no_divergence(a):
            return False
        amin = a.min(0) if H.np else a.amin(0)
        lowest = H.fmin(self.min_a, amin)
        newest = a[-1]
        if bool((newest <= amin).all()) and bool((newest < self.best_a).all()):
            self.best_a, self.best_r = newest, r[-1]
            self.best_f, self.best_own = self.images[-1], False
        else:
            jb = H.argmin0(a)
            cand = H.take0(a, jb)
            better = cand < self.best_a
            if self.n_active < len(self.active):
                better &= self.active
            self._update_best(jb, better, cand, H.take0(r, jb), a.shape[0] - 1, release=True)
        self.min_a, self.last_a = lowest, newest
        self._plan(r, a)
        self.a_list, self.n_list, self.images, self.iterates = [], [], [], []
        return True

    def _no_divergence(self, a: Any) -> bool:
        """Sufficient for "no sample diverged in this window" (norms finite): each ``a`` at most
        its predecessor (the usual contraction), or every ``a`` within the divergence factor of
        the smallest value so far."""
        if self.k0 == 0 or bool((a[0] <= self.min_a * DIVERGENCE_FACTOR).all()):
            if a.shape[0] < 2 or bool((a[1:] <= a[:-1]).all()):
                return True
        H = _host._HOST
        lowest = H.fmin(self.min_a, a.min(0) if H.np else a.amin(0))
        return bool(((a.max(0) if H.np else a.amax(0)) <= lowest * DIVERGENCE_FACTOR).all())

    def _exact_norms(self, a: Any, n: Any, first: bool) -> Tuple[Any, Any]:
        """Norms that may have underflowed (below ``underflow``): recomputed in float64, entry
        by entry, so that the result does not depend on which iterations share a window."""
        H = _host._HOST
        low = (a if n is None else n) < self.underflow
        a = a.copy() if H.np else a.clone()
        n = None if n is None else (n.copy() if H.np else n.clone())
        for j in range(len(self.images)):
            rows = H.nonzero(low[j])
            if len(rows) == 0:
                continue
            z = self._iterate(j)
            fz = self._img(j)
            rows_dev = H.torch(rows, self.device)
            f64 = fz.detach().index_select(0, rows_dev).to(torch.float64).reshape(len(rows), -1)
            z64 = z.detach().index_select(0, rows_dev).to(torch.float64).reshape(len(rows), -1)
            a[j, rows] = H.host(torch.linalg.vector_norm(f64 - z64, dim=1))
            if n is not None:
                n[j, rows] = H.host(torch.linalg.vector_norm(f64, dim=1))
                if first and j == 0:
                    s = torch.maximum(torch.linalg.vector_norm(z64, dim=1), torch.linalg.vector_norm(f64, dim=1))
                    self.floor[rows] = H.fmax(H.host(REL_EPS * s), torch.finfo(torch.float64).tiny)
        return a, n

    def _update_best(self, jb: Any, better: Any, cand: Any, rb: Any, last: int, release: bool = False) -> None:
        """Best images of the rows ``better``: row ``i`` from the window's image ``jb[i]``. The
        kept images are read first; with ``release`` (nothing else needs this window's images)
        all but the newest are then let go, so that replaying an older one holds less."""
        H = _host._HOST
        if not bool(better.any()):
            return
        self.best_a = H.where(better, cand, self.best_a)
        self.best_r = H.where(better, rb, self.best_r)
        if bool(better.all()) and bool((jb == last).all()):
            self.best_f, self.best_own = self.images[last], False  # the common case: the newest image
            return
        if self.best_f is None:
            best = torch.empty_like(self.images[-1])
        elif self.best_own and not self.grad_on:
            best = self.best_f  # our own buffer, not an image the loop still uses: in place
        else:
            best = self.best_f.clone()
        js = H.unique(jb[better])
        order = [j for j in js if self.images[j] is not None] + [j for j in js if self.images[j] is None]
        for j in order:
            if release and self.images[j] is None:
                release = False
                for i in range(1, last):  # the first iterate stays: replays start there
                    self.images[i] = self.iterates[i + 1] = None  # type: ignore[call-overload]
            rows = H.torch(H.nonzero(better & (jb == j)), self.device)
            best.index_copy_(0, rows, self._img(int(j)).index_select(0, rows))
        self.best_f, self.best_own = best, True

    def _stop(self, k: int, has: Any, jstop: Any, conv: Any, fin: Any, r: Any) -> Optional[Any]:
        H = _host._HOST
        sel = H.nonzero(has)
        js = jstop[sel]
        csel = H.take0(conv[:, sel], js)
        fsel = H.take0(fin[:, sel], js)
        for j in H.unique(js[~fsel]) if not bool(fsel.all()) else []:
            rows = H.torch(sel[(js == j) & ~fsel], self.device)
            bad = self._img(j).index_select(0, rows)
            if not bool(torch.isfinite(bad).all()):
                raise FixedPointError(nonfinite_message(self.what, self.k0 + j + 1))
        gidx = sel if self.idx is None else self.idx[sel]
        if self.z_out is None and len(sel) == len(self.res_out) and bool(csel.all()) and bool((js == js[0]).all()):
            # The whole batch converged at one iteration: its image is the result, no copy.
            j = int(js[0])
            self.z_out = self._img(j)
            self.it_out[:] = self.k0 + j + 1
            self.res_out[:] = r[j]
            self.st_out[:] = int(Status.CONVERGED)
            self.active[:] = False
            self.n_active = 0
            return sel
        if self.z_out is None:
            self.z_out = torch.empty_like(self.z0)
        for j in H.unique(js):
            m = js == j
            rows = sel[m]
            rows_dev = H.torch(rows, self.device)
            g_dev = H.torch(gidx[m], self.device)
            cj = csel[m]
            img = self._img(j).index_select(0, rows_dev)
            if not bool(cj.all()):
                keep = H.torch(cj, self.device).unsqueeze(1)
                img = torch.where(keep, img, self._best().index_select(0, rows_dev))
            self.z_out.index_copy_(0, g_dev, img)
            self.it_out[gidx[m]] = self.k0 + j + 1
        rs = H.take0(r[:, sel], js)
        self.res_out[gidx] = H.where(csel, rs, self.best_r[sel])
        self.st_out[gidx] = H.where(csel, int(Status.CONVERGED), int(Status.DIVERGED))
        if self.idx is None and not self.compact and not bool(csel.all()):
            diverged = H.full(len(self.active), False, "b")
            diverged[sel] = ~csel
            mask = H.torch(diverged, self.device).unsqueeze(1)
            self.held = mask if self.held is None else self.held | mask
        self.active[sel] = False
        self.n_active = int(self.active.sum())
        return sel

    def _plan(self, r: Any, a: Any) -> None:
        """The next window: until the slowest (full batch) or fastest (compact) sample should
        meet ``tol`` at its contraction rate over this window, within ``[1, limit]``."""
        w = r.shape[0]
        if self.n_active == 0 or w < 2:
            self.window = min(2, self.limit)
            return
        lib = _np if _host._HOST.np else torch
        r0, r1 = r[0], r[-1]
        if self.n_active < len(self.active):
            r0, r1 = r0[self.active], r1[self.active]
        # Per sample: iterations left = log(tol / r1) / log(rate); a rate >= 1 (or NaN) gives
        # -inf or NaN here, sorted out below by the largest-window fallback.
        H = _host._HOST
        lq = lib.log(H.fmax(r1, 1e-300) / H.fmax(r0, 1e-300)) / (w - 1)
        need = lib.log(self.tol / H.fmax(r1, 1e-300)) / H.fmin(lq, -1e-12)
        if not bool((lq < -1e-9).all()):
            need = lib.where(lq < -1e-9, need, math.inf)
        guess = float(need.min() if self.compact else need.max())
        if not math.isfinite(guess):
            self.window = self.limit
        else:
            self.window = int(min(self.limit, max(1, math.ceil(guess - 1e-3))))

    # -- after a stop ----------------------------------------------------------------------
    def advance(self, z_next: Tensor, state: Any) -> Tuple[Tensor, Any]:
        """Drop the stopped rows (``compact``): the next working iterate and solver state."""
        H = _host._HOST
        if not self.compact:
            return z_next, state
        keep = H.nonzero(self.active)
        keep_dev = H.torch(keep, self.device)
        self.best_a, self.best_r = self.best_a[keep], self.best_r[keep]
        self.min_a, self.last_a = self.min_a[keep], self.last_a[keep]
        if self.best_f is not None:
            self.best_f, self.best_own = self.best_f[keep_dev], True
        if self.floor is not None:
            self.floor = self.floor[keep]
        if self.floor_dev is not None:
            self.floor_dev = self.floor_dev[keep_dev]
        self.idx = keep if self.idx is None else self.idx[keep]
        self.idx_dev = H.torch(self.idx, self.device)
        self.active = H.full(len(keep), True, "b")
        self.n_active = len(keep)
        return z_next[keep_dev], _select(state, keep_dev)

    def result(self, k: int) -> Tuple[Tensor, SolveStats]:
        """``(z*, stats)``; rows still running hold their best image."""
        H = _host._HOST
        B, device = self.z0.shape[0], self.device
        if self.n_active:
            sel = H.nonzero(self.active)
            gidx = sel if self.idx is None else self.idx[sel]
            best = self._best()
            if self.z_out is None and self.idx is None:
                self.z_out = best  # no sample stopped: every row is its best image
            else:
                if self.z_out is None:
                    self.z_out = torch.empty_like(self.z0)
                self.z_out.index_copy_(0, H.torch(gidx, device), best.index_select(0, H.torch(sel, device)))
            self.res_out[gidx] = self.best_r[sel]
            self.it_out[gidx] = k
        stats = SolveStats(
            iterations=H.torch(self.it_out, device),
            residual=H.torch(self.res_out, device, self.z0.dtype),
            status=H.torch(self.st_out, device),
            trace=H.torch(self._trace(B), device, self.z0.dtype),
        )
        return self.z_out if self.z_out is not None else self.z0, stats

    def last_stop(self) -> int:
        """The largest iteration count of the solve (after :meth:`result`)."""
        return int(self.it_out.max()) if len(self.it_out) else 0

    def _trace(self, B: int) -> Any:
        H, traces = _host._HOST, self.traces
        T = sum(tr.shape[0] for _, tr in traces)
        if H.np and all(tidx is None for tidx, _ in traces):
            trace = _np.concatenate([tr for _, tr in traces]) if traces else H.full(0, math.nan, "f").reshape(0, B)
        else:
            trace = H.full(T * B, math.nan, "f").reshape(T, B)
            t = 0
            for tidx, tr in traces:
                if tidx is None:
                    trace[t : t + tr.shape[0]] = tr
                else:
                    trace[t : t + tr.shape[0], tidx] = tr
                t += tr.shape[0]
        if T and not (self.n_active == B and self.idx is None):
            # NaN after each sample's stop: iteration t + 1 > its iteration count.
            steps = _np.arange(T) if H.np else torch.arange(T)
            trace[steps[:, None] >= self.it_out[None, :]] = math.nan
        # Iterations run after the last stop inside a window are not part of any sample's solve.
        return trace[: int(self.it_out.max())] if T and B else trace


def _select(state: Any, keep: Tensor) -> Any:
    return {k: (v[keep] if isinstance(v, Tensor) else v) for k, v in state.items()}
