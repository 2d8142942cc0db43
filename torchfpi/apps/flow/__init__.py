"""Optical flow as a fixed point: Horn-Schunck as a plain FPI, and a learned variational model.

Modules: :mod:`._ops` (warping, pyramids), :mod:`.baselines` (OpenCV Farneback / DIS,
Horn-Schunck), :mod:`.variational` (the learned energy, its fixed-point map and the coarse-to-fine
scheme), :mod:`.synthetic` (training pairs made on the fly), :mod:`.train`.
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
from torchfpi.apps.flow.variational import FlowConfig, VariationalFlow

__all__ = [
    "MIDDLEBURY_GT_SEQUENCES", "check_pair", "load_middlebury", "read_image", "to_grey_tensor", "warp", "dis", "farneback", "horn_schunck",
    "horn_schunck_step", "FlowConfig", "VariationalFlow", "load_flow_model",
]  # fmt: skip
