"""torchfpi: differentiable forward and backward fixed-point iteration layers for PyTorch."""

from torchfpi._errors import ConvergenceWarning, FixedPointError

__version__ = "0.1.0"

__all__ = ["ConvergenceWarning", "FixedPointError", "__version__"]
