"""Loading the trained flow models: one entry, :func:`load_flow_model`, for the CLI and the scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from torchfpi.io import PathLike

#: The shipped weights of each learned method.
SHIPPED_WEIGHTS = {
    "fpi_gd": Path(__file__).resolve().parents[2] / "weights" / "flow_fpi_gd.pt",
    "fpi_nn": Path(__file__).resolve().parents[2] / "weights" / "flow_fpi_nn.pt",
}
METHODS = ("fpi_gd", "fpi_nn")


def load_flow_model(method: str = "fpi_gd", weights: Optional[PathLike] = None,
                    device: Union[str, torch.device, None] = None) -> nn.Module:
    """The learned flow model ``method`` in eval mode: ``flow, info = model(frame1, frame2)``.

    Args:
        method: ``"fpi_gd"`` (the variational energy solved by FPI) or ``"fpi_nn"`` (its FPI_NN
            refinement).
        weights: a weights file written by ``torchfpi train flow`` (default: the shipped one).
        device: where the model runs (default CPU).

    Raises:
        UsageError: an unknown ``method``.
        FileNotFoundError: no such weights file.
        DataError: not a torchfpi flow weights file, or the weights of the other method.

    Example:
        >>> model = load_flow_model("fpi_gd")
        >>> f1 = torch.rand(1, 1, 32, 32) * 255
        >>> flow, info = model(f1, f1)
        >>> tuple(flow.shape)
        (1, 2, 32, 32)
    """
    from torchfpi.errors import UsageError

    if method not in METHODS:
        raise UsageError(f"method: expected one of {METHODS}, got '{method}'")
    path = Path(weights) if weights is not None else SHIPPED_WEIGHTS[method]
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    model: nn.Module
    if method == "fpi_nn":
        from torchfpi.apps.flow.refine import load_refined

        model = load_refined(path)
    else:
        from torchfpi.apps.flow.train import load_weights

        model = load_weights(path)
    return model.to(torch.device(device) if device is not None else torch.device("cpu")).eval()


__all__ = ["SHIPPED_WEIGHTS", "METHODS", "load_flow_model"]
