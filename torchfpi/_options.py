"""The options of a fixed-point solve: one frozen, validated dataclass for every entry point.

:func:`torchfpi.fixed_point`, :class:`torchfpi.FPILayer`, :class:`torchfpi.FPINN` and
:class:`torchfpi.FPIGD` all build an :class:`Options`; the layers take the same keywords as
``fixed_point`` (or an ``options=Options(...)``), so the list is written here once.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Optional, Tuple, Union

import torch

from torchfpi._adjoints import Adjoint, resolve_adjoint
from torchfpi._graph import check_graph_options
from torchfpi._solvers import Solver, resolve_solver

ON_FAILURE = ("warn", "raise", "ignore")
RESIDUALS = ("relative", "absolute")
STOPS = ("sample", "batch")


def check_positive(name: str, value: object) -> float:
    """``value`` as a ``float`` if it is a finite real number > 0.

    Any ``numbers.Real`` is accepted (``float``, ``int``, ``numpy.float32``, ...); ``bool``,
    strings and tensors are a ``TypeError``; NaN, Inf, zero and negatives a ``ValueError``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a positive number, got {type(value).__name__} {value!r}")
    result = float(value)
    if not (math.isfinite(result) and result > 0):
        raise ValueError(f"{name}: expected a positive number (finite, > 0), got {value!r}")
    return result


def check_integer(name: str, value: object, minimum: Optional[int] = 1) -> int:
    """``value`` as an ``int`` if it is an integer >= ``minimum`` (any integer if ``None``).

    Any ``numbers.Integral`` is accepted (``int``, ``numpy.int64``, ...); ``bool``, floats
    (even ``5.0``) and strings are a ``TypeError``; a value below ``minimum`` a ``ValueError``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        bound = "" if minimum is None else f" >= {minimum}"
        raise TypeError(f"{name}: expected an integer{bound}, got {type(value).__name__} {value!r}")
    result = int(value)
    if minimum is not None and result < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return result


def _check_tol(name: str, value: object, relative: bool) -> float:
    tol = check_positive(name, value)
    if relative and tol >= 1.0:
        # ||f(z) - z|| / (||f(z)|| + 1e-9) >= 1 means "the step is as large as the iterate":
        # such a test passes for almost any map, converging or not.
        raise ValueError(
            f"{name}: a relative residual tolerance must be < 1 (a step as large as the iterate "
            f"would pass), got {value!r}; use residual='absolute' for a tolerance in the state's units"
        )
    return tol


def _check_per_sample(value: object) -> Optional[Tuple[int, ...]]:
    if value is None:
        return None
    items = tuple(value) if isinstance(value, (tuple, list, range)) else None
    if items is None or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in items):
        raise TypeError(f"per_sample: expected None or a sequence of input indices (ints >= 0), got {value!r}")
    if any(int(i) < 0 for i in items):
        raise ValueError(f"per_sample: expected input indices >= 0, got {value!r}")
    if len(set(int(i) for i in items)) != len(items):
        raise ValueError(f"per_sample: an input index is listed twice, got {value!r}")
    return tuple(int(i) for i in items)


def _check_compute_dtype(value: object) -> Optional[torch.dtype]:
    if value is None:
        return None
    if not isinstance(value, torch.dtype):
        raise TypeError(
            f"compute_dtype: expected None or a floating torch.dtype (e.g. torch.bfloat16), "
            f"got {type(value).__name__} {value!r}"
        )
    if not value.is_floating_point:
        raise ValueError(f"compute_dtype: expected a floating torch.dtype (e.g. torch.bfloat16), got {value}")
    return value


@dataclass(frozen=True)
class Options:
    """Every keyword option of :func:`torchfpi.fixed_point`, validated once on construction.

    The fields keep what the caller wrote (``backward_tol=None`` stays ``None``); the resolved
    values the solve uses are :attr:`solver_object`, :attr:`adjoint`, :attr:`adjoint_tol` and
    :attr:`adjoint_max_iter`. See :func:`torchfpi.fixed_point` for the meaning of each field.

    Validation: ``tol`` and ``backward_tol`` are finite numbers > 0 (below 1 for the relative
    residual); ``max_iter`` and ``backward_max_iter`` integers >= 1 (``numpy`` integers too);
    ``bool`` is never taken for a number; ``compute_dtype`` is ``None`` or a floating
    ``torch.dtype``; ``cuda_graph=True`` needs FPI (``solver="fpi"`` or ``torchfpi.FPI``),
    ``compact=False`` and an implicit backward (its CUDA device is checked when solving);
    ``stop`` is ``"sample"`` or ``"batch"`` (the latter with ``compact=False``).

    Raises:
        ValueError: an unknown name or an out-of-range value (NaN, Inf, <= 0, a relative
            ``tol >= 1``); TypeError: a wrong type (a string, a ``bool``, a float ``max_iter``).

    Example:
        >>> import torchfpi
        >>> opts = torchfpi.Options(tol=1e-8, backward="anderson")
        >>> opts.adjoint_tol, opts.replace(tol=1e-4).tol
        (1e-08, 0.0001)
    """

    solver: Union[str, Solver] = "fpi"
    backward: Union[str, Adjoint] = "fpi"
    tol: float = 1e-6
    max_iter: int = 100
    backward_tol: Optional[float] = None
    backward_max_iter: Optional[int] = None
    on_failure: str = "warn"
    residual: str = "relative"
    compact: bool = False
    batched: bool = True
    per_sample: Optional[Tuple[int, ...]] = None
    compute_dtype: Optional[torch.dtype] = None
    cuda_graph: bool = False
    stop: str = "sample"
    solver_object: Solver = field(init=False, repr=False, compare=False)
    adjoint: Adjoint = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalised values are written once, here
        put(self, "solver_object", resolve_solver(self.solver))
        put(self, "adjoint", resolve_adjoint(self.backward))
        for name, choices in (("on_failure", ON_FAILURE), ("residual", RESIDUALS), ("stop", STOPS)):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name}: expected one of {list(choices)}, got {type(value).__name__} {value!r}")
            if value not in choices:
                raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
        relative = self.residual == "relative"
        put(self, "tol", _check_tol("tol", self.tol, relative))
        put(self, "max_iter", check_integer("max_iter", self.max_iter))
        if self.backward_tol is not None:
            put(self, "backward_tol", _check_tol("backward_tol", self.backward_tol, relative))
        if self.backward_max_iter is not None:
            put(self, "backward_max_iter", check_integer("backward_max_iter", self.backward_max_iter))
        if not isinstance(self.compact, bool):
            raise TypeError(f"compact: expected a bool, got {type(self.compact).__name__}")
        if not isinstance(self.batched, bool):
            raise TypeError(f"batched: expected a bool, got {type(self.batched).__name__}")
        put(self, "per_sample", _check_per_sample(self.per_sample))
        put(self, "compute_dtype", _check_compute_dtype(self.compute_dtype))
        if not isinstance(self.cuda_graph, bool):
            raise TypeError(f"cuda_graph: expected a bool, got {type(self.cuda_graph).__name__} {self.cuda_graph!r}")
        if self.stop == "batch" and self.compact:
            raise ValueError("stop='batch' stops every sample at once, so there are no stopped samples to "
                             "drop: use compact=False (or stop='sample')")
        if self.cuda_graph:
            check_graph_options(self.solver_object, self.compact, bool(getattr(self.adjoint, "records_forward", False)))

    @property
    def adjoint_tol(self) -> float:
        """Tolerance of the adjoint solve: ``backward_tol``, or ``tol`` when that is ``None``."""
        return self.tol if self.backward_tol is None else self.backward_tol

    @property
    def adjoint_max_iter(self) -> int:
        """Budget of the adjoint solve: ``backward_max_iter``, or ``max_iter`` when ``None``."""
        return self.max_iter if self.backward_max_iter is None else self.backward_max_iter

    @property
    def absolute(self) -> bool:
        """True for ``residual="absolute"``."""
        return self.residual == "absolute"

    def replace(self, **changes: Any) -> Options:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def build(cls, options: Optional[Options], keywords: Mapping[str, Any], owner: str) -> Options:
        """``options`` updated by ``keywords``: how the layers take ``fixed_point``'s keywords.

        Raises:
            TypeError: a keyword that is not an option (naming the valid ones).
        """
        names = [f.name for f in fields(cls) if f.init]
        unknown = sorted(set(keywords) - set(names))
        if unknown:
            raise TypeError(f"{owner}: unknown option(s) {unknown}; expected keywords among {names}")
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options: expected a torchfpi.Options, got {type(options).__name__}")
        return (options or cls()).replace(**keywords) if keywords else (options or cls())
