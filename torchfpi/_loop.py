"""The per-sample iteration loop that every solver shares, forward and adjoint.

:func:`iterate` calls the map and the solver. Residual norms are computed on the device at
every iteration, but read on the host only once per *window* of ``w`` iterations (one transfer
of a ``(w, 2, B)`` block): there a :class:`_Book` replays the window sample by sample and
decides, exactly as a per-iteration test would, at which iteration each sample converged,
diverged or hit NaN, and which image is its best. The images of the window are kept (a bounded
number, :data:`WINDOW_BYTES`), so a sample that met ``tol`` inside the window is frozen at that
iteration: the results do not depend on the window length, nor on the rest of the batch. The
window length adapts to the observed contraction rate (the iteration at which the slowest
sample should meet ``tol``), so a solve syncs with the host two to four times; a solve that
repeats an earlier one (same map, shapes and options: ``history``) starts with a window as
long as that solve was, and usually syncs once. (A solve much shorter than the previous one
then runs up to that many iterations before its first read: time lost, results unchanged.)

The convergence test (documented in :func:`relative_residual`):

* the residual of sample ``i`` at iteration ``k`` is ``r = ||f(z) - z|| / max(||f(z)||, floor_i)``
  with ``floor_i = REL_EPS * max(||z0_i||, ||f(z0)_i||)`` (and at least the dtype's ``tiny``),
  or ``||f(z) - z||`` with ``residual="absolute"``;
* a sample converges at ``k`` when ``r < tol`` **and** its absolute residual ``a = ||f(z) - z||``
  is zero or shrank: ``a_k <= CONTRACTION * a_{k-1}``. A map that drifts by a constant step
  (``z + 1``) never passes, however large ``z`` grows; so a sample needs two iterations to
  converge unless ``f(z0) == z0`` exactly;
* a sample diverges when ``a`` exceeds ``DIVERGENCE_FACTOR`` times its smallest value so far,
  or the norms overflow; NaN or Inf in ``f``'s output raise :class:`FixedPointError`;
* a sample that did not converge returns its best image by absolute residual.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional, Tuple

import torch
from torch import Tensor

from torchfpi._book import KEEP_IMAGES, REL_EPS, _Book
from torchfpi._graph import GraphBlock
from torchfpi._solution import SolveStats
from torchfpi._solvers import FPI

Call = Callable[[Tensor, Optional[Tensor]], Tensor]
"""``call(z_work, idx)``: the map on the working rows; ``idx`` their ``(b,)`` original rows or None."""

HISTORY_SIZE = 64
"""Solves remembered for planning the first window (see :func:`iterate`'s ``history``)."""

_HISTORY: OrderedDict[Hashable, int] = OrderedDict()
_HISTORY_LOCK = threading.Lock()


def history_key(*parts: Any) -> Optional[Hashable]:
    """A key for :func:`iterate`'s ``history`` (None if a part is unhashable: no history)."""
    try:
        hash(parts)
    except TypeError:
        return None
    return parts


def map_identity(f: Any) -> Tuple[int, int]:
    """Who ``f`` is, stable across accesses of a bound method (``module.step`` is a new object
    each time): the ids of its function and of the object it is bound to."""
    return id(getattr(f, "__func__", f)), id(getattr(f, "__self__", None))


def _recall(key: Optional[Hashable]) -> Optional[int]:
    if key is None:
        return None
    with _HISTORY_LOCK:
        return _HISTORY.get(key)


def _remember(key: Optional[Hashable], k: int) -> None:
    if key is None:
        return
    with _HISTORY_LOCK:
        _HISTORY[key] = k
        _HISTORY.move_to_end(key)
        while len(_HISTORY) > HISTORY_SIZE:
            _HISTORY.popitem(last=False)


def relative_residual(fz: Tensor, z: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    r"""Per-sample relative residual ``||f(z) - z|| / max(||f(z)||, 1e-9 s, tiny)``, shape ``(B,)``.

    The convergence measure of :func:`torchfpi.fixed_point` (``residual="relative"``): norms are
    Euclidean over every non-batch dimension; ``s`` is the sample's scale, in ``fixed_point``
    ``max(||z0||, ||f(z0)||)`` (here ``scale``, default ``max(||z||, ||f(z)||)``), so the floor
    only matters for a fixed point at zero, at any scale of the problem (a fixed point near
    1e-30 is measured relative to itself); ``tiny`` is the dtype's smallest normal number.
    ``fixed_point`` also requires the absolute residual to shrink at the stopping iteration
    (see :data:`CONTRACTION`), so a drifting map such as ``z + 1`` never converges.

    Args:
        fz: ``(B, ...)`` the map's image ``f(z)``.
        z: ``(B, ...)`` the iterate.
        scale: optional ``(B,)`` per-sample scale ``s``.

    Example:
        >>> import torch, torchfpi
        >>> torchfpi.relative_residual(torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 3.0]]))
        tensor([0.2000])
    """
    b = fz.shape[0]
    a = torch.linalg.vector_norm((fz - z).reshape(b, -1), dim=1)
    n = torch.linalg.vector_norm(fz.reshape(b, -1), dim=1)
    if scale is None:
        scale = torch.maximum(n, torch.linalg.vector_norm(z.reshape(b, -1), dim=1))
    floor = (REL_EPS * scale.to(n.dtype)).clamp_min(torch.finfo(n.dtype).tiny)
    return a / torch.maximum(n, floor)


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
    history: Optional[Hashable] = None,
    batch_stop: bool = False,
) -> Tuple[Tensor, SolveStats]:
    """Iterate ``z <- solver.step(state, z, call(z), r)`` per sample until each stops.

    Args:
        call: the map on the working rows (see :data:`Call`).
        z0: ``(B, N)`` initial iterate.
        solver: an object of the solver protocol (see :mod:`torchfpi._solvers`). Its ``step``
            gets the ``(b,)`` residual as a device tensor, or ``None`` if the solver declares
            ``uses_residual = False`` (``FPI`` ignores it, so it is not computed).
        first_fz: the map already evaluated at ``z0`` (saves one call).
        what: the solve's name in error messages.
        history: a key naming this kind of solve (map, shape, options; see
            :func:`history_key`): the first window runs to the iteration at which the last
            solve under the same key stopped, instead of two iterations, so that a repeated
            solve (a training loop) usually reads the host once or twice. It changes when the
            host is read, never the results (they do not depend on the window).
        batch_stop: ``stop="batch"``: samples stop as usual, but once the last one converged
            every converged sample takes the image of that iteration (one image for the batch,
            no per-sample gather); diverged samples keep their own results.

    Returns:
        ``(z_star, stats)``: ``z_star`` is ``(B, N)``; converged samples hold ``f(z_k)`` at the
        iteration where they converged, the others the best image seen (by absolute residual).
    """
    fpi = isinstance(solver, FPI)
    book = _Book(z0, tol, absolute, compact, what, fpi)
    book.batch_stop = batch_stop
    if fpi and not book.defer and not book.grad_on:
        book.replay_with(call, float(solver.damping), KEEP_IMAGES)
    past = _recall(history)
    if past is not None:
        book.window = max(1, min(book.limit, past))
    want_r = bool(getattr(solver, "uses_residual", not fpi))
    zw = z0
    state = None
    k = 0
    end = 0  # the iteration that closes the current window
    while k < max_iter:
        k += 1
        if k > end:
            end = min(max_iter, k - 1 + book.window)
        fz = first_fz if (k == 1 and first_fz is not None) else call(zw, book.idx_dev)
        r = book.measure(fz, zw, want_r)
        stopped = None
        if k == end:
            stopped = book.check(k)
            if book.n_active == 0:
                break
        if state is None:
            state = solver.init(zw, fz)
        z_next = solver.step(state, zw, fz, r)
        if book.held is not None:
            z_next = torch.where(book.held, zw, z_next)
        zw = z_next
        if stopped is not None:
            zw, state = book.advance(zw, state)
    z_star, stats = book.result(k)
    _remember(history, book.last_stop())
    return z_star, stats


def iterate_graph(
    block: GraphBlock,
    z0: Tensor,
    *,
    tol: float,
    max_iter: int,
    absolute: bool = False,
    what: str = "fixed_point",
    batch_stop: bool = False,
) -> Tuple[Tensor, SolveStats]:
    """:func:`iterate` for FPI with a captured CUDA graph: one replay and one host read per
    window of ``block.block`` iterations; the same per-sample results (see :mod:`torchfpi._graph`)."""
    book = _Book(z0, tol, absolute, False, what, True)
    book.defer = False
    book.batch_stop = batch_stop
    zw = z0
    k = 0
    while k < max_iter:
        its, ims, a, n, z_next = block.run(zw)
        w = min(block.block, max_iter - k)
        book.feed(its[:w], ims[:w], a[:w], None if n is None else n[:w])
        k += w
        book.check(k)
        if book.n_active == 0:
            break
        zw = z_next if book.held is None else torch.where(book.held, zw, z_next)
    return book.result(k)
