"""torchfpi: differentiable forward and backward fixed-point iteration layers for PyTorch.

The core, one idea per module: ``_solve`` (``fixed_point``, ``FPILayer``), ``_options`` (the one
validated ``Options``), ``_problem`` (state structure, map on flat states, autograd node),
``_loop`` (the per-sample loop; its bookkeeping in ``_book``, host arithmetic in ``_host``),
``_solvers`` (the solver protocol, FPI, Anderson; Broyden in
``_broyden``), ``_adjoints`` (every backward mode: the adjoint protocol and registry),
``_autograd`` (partial derivatives as graph nodes, ``energy_grad``), ``_solution``
(``Solution``, ``Status``, the failure report), ``_layers`` (FPI_NN, FPI_GD), ``_spectral``
(spectral radius, Jacobian penalty), ``_diagnostics`` (gradient checks); exceptions in ``errors``.

>>> import torch, torchfpi
>>> sol = torchfpi.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 3))
>>> bool(sol.converged.all())
True
"""

from torchfpi import energies, errors, io, runtime  # public sub-modules
from torchfpi._adjoints import (
    Adjoint,
    AdjointSystem,
    AndersonBackward,
    DenseBackward,
    FPIBackward,
    ImplicitAdjoint,
    NeumannBackward,
    OneStepBackward,
    UnrollBackward,
    register_adjoint,
)
from torchfpi._autograd import energy_grad
from torchfpi._diagnostics import GradientCheck, check_gradients
from torchfpi._layers import FPIGD, FPINN, ConvUpdate, MLPUpdate
from torchfpi._loop import relative_residual
from torchfpi._options import Options
from torchfpi._solution import Solution, SolveStats, Status
from torchfpi._solve import FPILayer, fixed_point
from torchfpi._solvers import FPI, Anderson, Broyden, Solver
from torchfpi._spectral import jacobian_penalty, spectral_radius
from torchfpi.errors import ConvergenceWarning, FixedPointError

register_adjoint("broyden", lambda: ImplicitAdjoint(Broyden()))  # backward="broyden": exact

__version__ = "0.2.0.dev0"  # the one source of the version (pyproject reads it)

__all__ = [
    "Adjoint",
    "AdjointSystem",
    "Anderson",
    "AndersonBackward",
    "Broyden",
    "ConvergenceWarning",
    "ConvUpdate",
    "DenseBackward",
    "FPI",
    "FPIBackward",
    "FPIGD",
    "FPILayer",
    "FPINN",
    "GradientCheck",
    "ImplicitAdjoint",
    "MLPUpdate",
    "FixedPointError",
    "NeumannBackward",
    "OneStepBackward",
    "Options",
    "Solution",
    "Solver",
    "SolveStats",
    "Status",
    "UnrollBackward",
    "__version__",
    "check_gradients",
    "energies",
    "errors",
    "io",
    "runtime",
    "energy_grad",
    "fixed_point",
    "jacobian_penalty",
    "register_adjoint",
    "relative_residual",
    "spectral_radius",
]
