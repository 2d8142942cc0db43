"""Optical flow as a fixed point: Horn-Schunck as a plain FPI, and a learned variational model.

Modules, as in the other applications: :mod:`.models` (``fpi_gd``: the learned energy, its
fixed-point map and the coarse-to-fine scheme; ``fpi_nn``: its FPI_NN refinement), :mod:`.api`
(:func:`load_flow_model` and the weights files), :mod:`.train` (both trainers),
:mod:`.baselines` (OpenCV Farneback / DIS, Horn-Schunck); helpers :mod:`._ops` (warping,
pyramids) and :mod:`.synthetic` (training pairs made on the fly).
"""

from torchfpi.apps.flow._ops import (
    MIDDLEBURY_GT_SEQUENCES,
    check_pair,
    load_middlebury,
    read_image,
    to_grey_tensor,
    warp,
)
from torchfpi.apps.flow.api import load_flow_model
from torchfpi.apps.flow.baselines import dis, farneback, horn_schunck, horn_schunck_step
from torchfpi.apps.flow.models import FlowConfig, RefineConfig, RefinedFlow, VariationalFlow

__all__ = [
    "MIDDLEBURY_GT_SEQUENCES", "check_pair", "load_middlebury", "read_image", "to_grey_tensor", "warp", "dis", "farneback", "horn_schunck",
    "horn_schunck_step", "FlowConfig", "RefineConfig", "RefinedFlow", "VariationalFlow", "load_flow_model",
]  # fmt: skip
