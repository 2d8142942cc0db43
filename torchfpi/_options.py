"""The options of a fixed-point solve: one frozen, validated dataclass for every entry point.

:func:`torchfpi.fixed_point`, :class:`torchfpi.FPILayer`, :class:`torchfpi.FPINN` and
:class:`torchfpi.FPIGD` all build an :class:`Options`; the layers take the same keywords as
``fixed_point`` (or an ``options=Options(...)``), so the list is written here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Optional, Tuple, Union

from torchfpi._adjoints import Adjoint, resolve_adjoint
from torchfpi._solvers import Solver, resolve_solver

ON_FAILURE = ("warn", "raise", "ignore")
RESIDUALS = ("relative", "absolute")


def _check_tol(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


def _check_max_iter(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return value


def _check_per_sample(value: object) -> Optional[Tuple[int, ...]]:
    if value is None:
        return None
    items = tuple(value) if isinstance(value, (tuple, list, range)) else None
    if items is None or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise TypeError(f"per_sample: expected None or a sequence of input indices (ints >= 0), got {value!r}")
    return items


@dataclass(frozen=True)
class Options:
    """Every keyword option of :func:`torchfpi.fixed_point`, validated once on construction.

    The fields keep what the caller wrote (``backward_tol=None`` stays ``None``); the resolved
    values the solve uses are :attr:`solver_object`, :attr:`adjoint`, :attr:`adjoint_tol` and
    :attr:`adjoint_max_iter`. See :func:`torchfpi.fixed_point` for the meaning of each field.

    Raises:
        ValueError: an unknown name or an out-of-range value; TypeError: a wrong type.

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
    solver_object: Solver = field(init=False, repr=False, compare=False)
    adjoint: Adjoint = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalised values are written once, here
        put(self, "solver_object", resolve_solver(self.solver))
        put(self, "adjoint", resolve_adjoint(self.backward))
        put(self, "tol", _check_tol("tol", self.tol))
        put(self, "max_iter", _check_max_iter("max_iter", self.max_iter))
        if self.backward_tol is not None:
            put(self, "backward_tol", _check_tol("backward_tol", self.backward_tol))
        if self.backward_max_iter is not None:
            put(self, "backward_max_iter", _check_max_iter("backward_max_iter", self.backward_max_iter))
        if self.on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure: expected one of {list(ON_FAILURE)}, got {self.on_failure!r}")
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual: expected one of {list(RESIDUALS)}, got {self.residual!r}")
        if not isinstance(self.compact, bool):
            raise TypeError(f"compact: expected a bool, got {type(self.compact).__name__}")
        if not isinstance(self.batched, bool):
            raise TypeError(f"batched: expected a bool, got {type(self.batched).__name__}")
        put(self, "per_sample", _check_per_sample(self.per_sample))

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
