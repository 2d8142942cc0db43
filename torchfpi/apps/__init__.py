"""Applications of torchfpi on real data: multi-label classification, denoising, optical flow.

Each application is one importable module driven by the ``torchfpi`` CLI. Applications depend on
the library, never the reverse. Their third-party needs are the ``torchfpi[apps]`` extra.
"""

from torchfpi.apps._distributed import DistContext, session
from torchfpi.apps._training import describe_exception
from torchfpi.apps._weights import read_weights

__all__ = ["DistContext", "describe_exception", "read_weights", "session"]
