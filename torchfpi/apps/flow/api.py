"""Loading the flow models: one entry, :func:`load_flow_model`, for the CLI and the scripts.

The methods are listed here once (:data:`METHODS`, the learned ones in :data:`LEARNED`) with
their shipped weights; ``torchfpi flow --method``, ``torchfpi train flow --model`` and
``scripts/run_flow.py`` take them from here. The weights files are written and read by
:func:`save_weights` / :func:`load_weights` (``fpi_gd``) and :func:`save_refined` /
:func:`load_refined` (``fpi_nn``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import torch
from torch import nn

from torchfpi import errors, io
from torchfpi.apps._training import describe_exception
from torchfpi.apps._weights import read_weights, weights_meta
from torchfpi.apps.flow.models import FlowConfig, RefineConfig, RefinedFlow, VariationalFlow
from torchfpi.io import PathLike

#: The shipped weights of each learned method.
SHIPPED_WEIGHTS = {
    "fpi_gd": Path(__file__).resolve().parents[2] / "weights" / "flow_fpi_gd.pt",
    "fpi_nn": Path(__file__).resolve().parents[2] / "weights" / "flow_fpi_nn.pt",
}
#: The learned methods (they have weights; ``torchfpi train flow --model``).
LEARNED = ("fpi_gd", "fpi_nn")
#: Every method :func:`load_flow_model` runs (``torchfpi flow --method``).
METHODS = (*LEARNED, "horn_schunck")


def load_flow_model(method: str = "fpi_gd", weights: Optional[PathLike] = None,
                    device: Union[str, torch.device, None] = None) -> nn.Module:
    """The flow model ``method`` in eval mode: ``flow, info = model(frame1, frame2)``.

    Args:
        method: ``"fpi_gd"`` (the variational energy solved by FPI), ``"fpi_nn"`` (its FPI_NN
            refinement) or ``"horn_schunck"`` (:class:`~torchfpi.apps.flow.baselines.HornSchunck`,
            no weights).
        weights: a weights file written by ``torchfpi train flow`` (default: the shipped one).
        device: where the model runs (default CPU).

    Raises:
        UsageError: an unknown ``method``, or ``weights`` for ``"horn_schunck"``.
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
    model: nn.Module
    if method == "horn_schunck":
        if weights is not None:
            raise UsageError("weights: not for method 'horn_schunck' (it has no learned weights)")
        from torchfpi.apps.flow.baselines import HornSchunck

        model = HornSchunck()
    else:
        path = Path(weights) if weights is not None else SHIPPED_WEIGHTS[method]
        if not path.exists():
            raise FileNotFoundError(2, "No such file or directory", str(path))
        model = load_refined(path) if method == "fpi_nn" else load_weights(path)
    return model.to(torch.device(device) if device is not None else torch.device("cpu")).eval()


def _read(path: PathLike, kind: str) -> Dict[str, Any]:
    """A flow weights file of model ``kind`` (DataError for another kind, naming its --method)."""
    blob = read_weights(path, "flow", "torchfpi flow weights")
    if blob["meta"].get("kind") != kind:
        raise errors.DataError(f"'{path}' holds {blob['meta'].get('kind')} flow weights, not {kind}: use them "
                               f"with --method {blob['meta'].get('kind')}")
    return blob


@contextmanager
def _built(path: PathLike) -> Iterator[None]:
    """Turn a failure to build the model from the file's contents into a DataError naming it."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise errors.DataError(f"'{path}' is not a torchfpi flow weights file ({describe_exception(exc)})") from exc


def load_weights(path: Path, device: Optional[torch.device] = None) -> VariationalFlow:
    """Load a :class:`VariationalFlow` saved by :func:`save_weights`.

    Read with ``weights_only=True``: a file holding other Python objects is refused unread.

    Raises:
        FileNotFoundError: no such file.
        DataError: not a torchfpi flow weights file, or the weights of the ``fpi_nn`` refinement
            (the message says to use ``--method fpi_nn``).
    """
    blob = _read(path, "fpi_gd")
    with _built(path):
        model = VariationalFlow(FlowConfig(**blob["flow_config"]))
        model.load_state_dict(blob["model"])
    return model.to(device or "cpu")


def training_data(procedural: bool) -> str:
    """The ``data`` entry of the weights' metadata."""
    return ("synthetic pairs on procedural noise textures" if procedural
            else "synthetic pairs on Train400 image textures")


def save_weights(model: VariationalFlow, path: Path, extra: Optional[Dict[str, Any]] = None,
                 procedural: bool = False) -> None:
    """Save the learned scalars, the solver config and their metadata (a few kB), atomically."""
    blob = {"model": model.state_dict(), "flow_config": asdict(model.config), **(extra or {}),
            "meta": weights_meta("flow", "fpi_gd", asdict(model.config), data=training_data(procedural))}
    io.atomic_torch_save(blob, path)


def save_refined(model: RefinedFlow, path: Path, extra: Optional[Dict[str, Any]] = None,
                 procedural: bool = False) -> None:
    """Save base and refinement weights with their configs and metadata, atomically."""
    arch = {"flow_config": asdict(model.base.config), "refine_config": asdict(model.config)}
    blob = {"base": model.base.state_dict(), "flow_config": asdict(model.base.config),
            "update": model.update.state_dict(), "refine_config": asdict(model.config), **(extra or {}),
            "meta": weights_meta("flow", "fpi_nn", arch, data=training_data(procedural))}
    io.atomic_torch_save(blob, path)


def load_refined(path: Path) -> RefinedFlow:
    """Load what :func:`save_refined` wrote (``weights_only=True``: never runs code from the file).

    Raises:
        FileNotFoundError: no such file.
        DataError: not a torchfpi flow weights file, or ``fpi_gd`` weights (use ``--method fpi_gd``).
    """
    blob = _read(path, "fpi_nn")
    with _built(path):
        base = VariationalFlow(FlowConfig(**blob["flow_config"]))
        base.load_state_dict(blob["base"])
        model = RefinedFlow(base, RefineConfig(**blob["refine_config"]))
        model.update.load_state_dict(blob["update"])
    return model


__all__ = ["SHIPPED_WEIGHTS", "LEARNED", "METHODS", "load_flow_model", "load_refined", "load_weights", "save_refined",
           "save_weights", "training_data"]
