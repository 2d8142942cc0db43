"""The result of a fixed-point solve: value, per-sample status, iteration counts, residual
traces, and the failure report that ``on_failure`` turns into a warning or an error."""

from __future__ import annotations

import enum
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Generic, Optional, Tuple, TypeVar

import torch
from torch import Tensor

from torchfpi.errors import ConvergenceWarning, FixedPointError

DIVERGENCE_FACTOR = 1e6
"""A sample diverges when its absolute residual exceeds this multiple of its smallest one."""

V = TypeVar("V", Tensor, Tuple[Tensor, ...])
"""The type of a solution's value: a tensor, or a tuple of tensors like ``z0``."""


class Status(enum.IntEnum):
    """Per-sample outcome of a solve (stored as ``int64`` codes in ``Solution.status``)."""

    CONVERGED = 0
    """The residual reached ``tol``."""
    MAX_ITER = 1
    """``max_iter`` iterations ran out first; the value is the best iterate seen."""
    DIVERGED = 2
    """The residual grew a million-fold over its smallest value, or the iterate overflowed."""


@dataclass
class SolveStats:
    """Statistics of one iterative solve, forward or backward.

    Attributes:
        iterations: ``(B,)`` int64, calls of the map spent on each sample.
        residual: ``(B,)`` final residual per sample (relative unless ``residual="absolute"``);
            the best one seen for samples that did not converge.
        status: ``(B,)`` int64 :class:`Status` codes.
        trace: ``(T, B)`` residual of each sample at each iteration, NaN once it stopped.
    """

    iterations: Tensor
    residual: Tensor
    status: Tensor
    trace: Tensor

    @property
    def converged(self) -> Tensor:
        """``(B,)`` bool: the samples whose residual reached the tolerance."""
        return self.status == Status.CONVERGED

    @property
    def diverged(self) -> Tensor:
        """``(B,)`` bool: the samples stopped for divergence."""
        return self.status == Status.DIVERGED

    def summary(self) -> str:
        """A one-line human summary, e.g. ``"8/8 converged, iterations 12..19, max residual 8e-07"``."""
        n = int(self.status.numel())
        conv = int(self.converged.sum())
        it = self.iterations
        res = self.residual
        return (
            f"{conv}/{n} converged, iterations {int(it.min()) if n else 0}..{int(it.max()) if n else 0}, "
            f"max residual {float(res.max()) if n else float('nan'):.2e}"
        )


class _Record:
    """Mutable holder of a solve's statistics, shared with the backward node.

    Kept apart from :class:`Solution` so the autograd graph never references the solution's
    value (a reference cycle through the graph would keep it alive).
    """

    __slots__ = ("stats", "backward")

    def __init__(self) -> None:
        self.stats: Optional[SolveStats] = None
        self.backward: Optional[SolveStats] = None


class Solution(Generic[V]):
    """Result of :func:`torchfpi.fixed_point`.

    Attributes:
        value: z*, with the structure, shape, dtype and device of ``z0`` (a tensor or a tuple
            of tensors); differentiable w.r.t. the inputs and the parameters of ``f``.
            ``Solution[Tensor]`` for a tensor ``z0``, ``Solution[Tuple[Tensor, ...]]`` for a tuple.

    Example:
        >>> import torch, torchfpi
        >>> sol = torchfpi.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 3), tol=1e-3)
        >>> sol.status.tolist(), sol.iterations.tolist(), sol.trace.shape
        ([0, 0], [10, 10], torch.Size([10, 2]))
    """

    __slots__ = ("value", "_record")
    value: V

    def __init__(self, value: V, record: _Record) -> None:
        self.value = value
        self._record = record

    def __repr__(self) -> str:
        return f"Solution({self.stats.summary()})"

    @property
    def stats(self) -> SolveStats:
        """Forward :class:`SolveStats`."""
        stats = self._record.stats
        if stats is None:  # pragma: no cover - the solve sets it before a Solution exists
            raise RuntimeError("Solution.stats: the forward solve recorded no statistics")
        return stats

    @property
    def backward(self) -> Optional[SolveStats]:
        """:class:`SolveStats` of the latest iterative backward solve through this solution.

        ``None`` before any backward ran, and for modes without an iterative adjoint solve
        (``"onestep"``, ``"unroll"``, ``"dense"``). ``"neumann"`` records its fixed term count.
        """
        return self._record.backward

    @property
    def iterations(self) -> Tensor:
        """``(B,)`` int64: forward iterations (calls of ``f``) per sample."""
        return self.stats.iterations

    @property
    def residual(self) -> Tensor:
        """``(B,)``: final forward residual per sample."""
        return self.stats.residual

    @property
    def converged(self) -> Tensor:
        """``(B,)`` bool: samples whose forward residual reached ``tol``."""
        return self.stats.converged

    @property
    def status(self) -> Tensor:
        """``(B,)`` int64 :class:`Status` codes of the forward solve."""
        return self.stats.status

    @property
    def trace(self) -> Tensor:
        """``(T, B)`` forward residual per iteration and sample (NaN after a sample stopped)."""
        return self.stats.trace


def _empty_stats(batch: int, device: torch.device, dtype: torch.dtype) -> SolveStats:
    return SolveStats(
        iterations=torch.zeros(batch, dtype=torch.int64, device=device),
        residual=torch.zeros(batch, dtype=dtype, device=device),
        status=torch.zeros(batch, dtype=torch.int64, device=device),
        trace=torch.zeros(0, batch, dtype=dtype, device=device),
    )


def report_failure(stats: SolveStats, on_failure: str, which: str, tol: float, max_iter: int) -> None:
    """Warn (``on_failure="warn"``) or raise (``"raise"``) if a sample diverged or ran out of
    iterations, naming the count, the knob to turn and the remedy; ``which`` is ``"forward"``
    or ``"backward"``. The warning is attributed to the user's line (:func:`warn_user`)."""
    if on_failure == "ignore":
        return
    status = stats.status
    n = int(status.numel())
    codes = status.detach().cpu().tolist()  # one transfer and host counts (runs after every solve)
    n_div = codes.count(int(Status.DIVERGED))
    n_max = codes.count(int(Status.MAX_ITER))
    if n_div == 0 and n_max == 0:
        return
    knob_iter = "max_iter" if which == "forward" else "backward_max_iter"
    knob_tol = "tol" if which == "forward" else "backward_tol"
    parts = []
    if n_div:
        first = int(stats.iterations[status == Status.DIVERGED].min())
        parts.append(
            f"{n_div} of {n} samples diverged (residual grew over {DIVERGENCE_FACTOR:.0e}-fold, "
            f"first at iteration {first}): the map is not a contraction there; use damping "
            "(torchfpi.FPI(damping=0.5)), a smaller step size, spectral normalisation, and check "
            "torchfpi.spectral_radius(...) < 1"
        )
    if n_max:
        worst = float(stats.residual[status == Status.MAX_ITER].max())
        hint = (
            "raise max_iter, use solver='anderson' or damping, or loosen tol"
            if which == "forward"
            else "raise backward_max_iter, use backward='anderson', or loosen backward_tol"
        )
        parts.append(
            f"{n_max} of {n} samples did not converge within {knob_iter}={max_iter} (worst "
            f"residual {worst:.2e} > {knob_tol}={tol:.1e}): the map may contract slowly "
            f"(spectral radius near 1); {hint}"
        )
    msg = f"{which} fixed-point solve: " + "; ".join(parts)
    if on_failure == "raise":
        raise FixedPointError(msg)
    warn_user(msg, ConvergenceWarning)


_CORE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_AUTOGRAD_DIR = os.path.join(_TORCH_DIR, "autograd")
_ENTRIES = frozenset({"backward", "grad", "_engine_run_backward"})


def _internal(frame: Any) -> bool:
    """A frame of the torchfpi core (the package's own modules, not apps/cli) or of torch."""
    path = os.path.abspath(frame.f_code.co_filename)
    return os.path.dirname(path) == _CORE_DIR or path.startswith(_TORCH_DIR + os.sep)


def _first_outside(frame: Any) -> Any:
    while frame is not None and _internal(frame):
        frame = frame.f_back
    return frame


def _user_frame() -> Any:
    """The user's frame that led here: the first frame outside torchfpi's core and torch.

    In a forward solve and in a backward run on the calling thread (CPU) it is on this
    thread's stack. A backward run by an autograd worker thread (CUDA and other devices) has
    only engine frames: then the thread blocked in ``Tensor.backward`` / ``torch.autograd.grad``
    is found (``sys._current_frames``) and its first user frame is returned. None if neither
    works (e.g. two threads in backward at once: the first one found is used).
    """
    frame = _first_outside(sys._getframe(1))
    if frame is not None:
        return frame
    me = threading.get_ident()
    for tid, top in sys._current_frames().items():
        if tid == me:
            continue
        f: Any = top
        while f is not None:
            code = f.f_code
            if code.co_name in _ENTRIES and os.path.abspath(code.co_filename).startswith(_AUTOGRAD_DIR + os.sep):
                found = _first_outside(f)
                if found is not None:
                    return found
            f = f.f_back
    return None


def warn_user(message: str, category: type = ConvergenceWarning) -> None:
    """``warnings.warn`` attributed to the user's line (see :func:`_user_frame`).

    The warning's filename and line are those of the user's call of ``fixed_point``, of a
    layer, or of ``.backward()`` / ``torch.autograd.grad`` for a backward solve, however deep
    in torchfpi and torch it was raised; filters and the ``"default"`` once-per-line registry
    work as for ``warnings.warn``. Without a user frame (a limit described in
    :func:`_user_frame`), the warning points at torchfpi's own line.
    """
    frame = _user_frame()
    if frame is None:
        warnings.warn(message, category, stacklevel=2)
        return
    g = frame.f_globals
    filename, lineno = frame.f_code.co_filename, frame.f_lineno
    del frame
    warnings.warn_explicit(
        message, category, filename, lineno, module=g.get("__name__", filename),
        registry=g.setdefault("__warningregistry__", {}),
    )
