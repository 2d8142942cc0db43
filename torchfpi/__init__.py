"""torchfpi: differentiable forward and backward fixed-point iteration layers for PyTorch.

>>> import torch, torchfpi
>>> sol = torchfpi.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 3))
>>> bool(sol.converged.all())
True
"""

from torchfpi._backward import (
    AndersonBackward,
    DenseBackward,
    FPIBackward,
    NeumannBackward,
    OneStepBackward,
    UnrollBackward,
)
from torchfpi._errors import ConvergenceWarning, FixedPointError
from torchfpi._solution import Solution, SolveStats, Status
from torchfpi._solve import FPILayer, fixed_point
from torchfpi._solvers import FPI, Anderson

__version__ = "0.1.0"

__all__ = [
    "Anderson",
    "AndersonBackward",
    "ConvergenceWarning",
    "DenseBackward",
    "FPI",
    "FPIBackward",
    "FPILayer",
    "FixedPointError",
    "NeumannBackward",
    "OneStepBackward",
    "Solution",
    "SolveStats",
    "Status",
    "UnrollBackward",
    "__version__",
    "fixed_point",
]
