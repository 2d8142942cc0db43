"""Loading trained denoisers (shipped weights or checkpoints) and applying them to images."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from torchfpi.apps._training import describe_exception
from torchfpi.apps._weights import check_kind, read_weights, sigma_mismatch, weights_meta
from torchfpi.apps.denoise.models import MODELS, build_model
from torchfpi.errors import DataError, UsageError
from torchfpi.io import PathLike, atomic_torch_save

#: Smallest image side the denoisers accept (their filters reflect-pad the image by up to 3 pixels).
MIN_IMAGE_SIDE = 8

#: What the shipped and trained denoisers learned from (stored in their metadata).
TRAINING_DATA = "Train400 crops with white Gaussian noise"

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"


def weights_path(kind: str, sigma: float, folder: Optional[PathLike] = None) -> Path:
    """``<folder>/denoise_<kind>_s<sigma>.pt`` (default folder: the package's ``weights/``)."""
    return Path(folder if folder is not None else WEIGHTS_DIR) / f"denoise_{kind}_s{sigma:g}.pt"


def available_sigmas(kind: str = "fpi_gd", folder: Optional[PathLike] = None) -> list:
    """Noise levels with weights for ``kind`` in ``folder`` (sorted)."""
    folder = Path(folder if folder is not None else WEIGHTS_DIR)
    out = []
    for p in folder.glob(f"denoise_{kind}_s*.pt"):
        try:
            out.append(float(p.stem.rsplit("_s", 1)[1]))
        except ValueError:
            continue
    return sorted(out)


def save_weights(export: Dict[str, Any], path: PathLike) -> None:
    """Write a trained model (``train()``'s export dict) as a small weights file (float32 state)."""
    slim = dict(export)
    slim["state_dict"] = {k: v.detach().float().clone() for k, v in export["state_dict"].items()}
    slim["meta"] = weights_meta("denoise", export["kind"], export["config"], sigma=export["sigma"],
                                data=TRAINING_DATA)
    atomic_torch_save(slim, path)


def load_denoiser(
    kind: str, sigma: float, weights: Optional[PathLike] = None
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Load the ``kind`` denoiser trained for ``sigma``.

    Args:
        kind: ``"fpi_gd"``, ``"unrolled"`` or ``"fpi_nn"``.
        sigma: noise level on the [0, 255] scale; weights must exist for exactly this level.
        weights: a weights file, or a folder holding ``denoise_<kind>_s<sigma>.pt``
            (default: the weights shipped with the package).

    Returns:
        ``(model in eval mode, metadata)`` where metadata has kind, sigma, config and training record.

    Raises:
        UsageError: unknown kind, no weights for this sigma (the message lists the ones there are),
            or a file holding weights of another kind.
        DataError: the file is not a torchfpi denoiser weights file (read with ``weights_only=True``:
            a file holding other Python objects is refused unread).

    Warns:
        UserWarning: ``weights`` names a file trained for another sigma (the message names it).
    """
    if kind not in MODELS:
        raise UsageError(f"--model: expected one of {sorted(MODELS)}, got '{kind}'")
    path = Path(weights) if weights is not None else None
    if path is None or path.is_dir():
        path = weights_path(kind, sigma, path)
        if not path.exists():
            have = available_sigmas(kind, path.parent)
            raise UsageError(
                f"--sigma: no {kind} weights for sigma {sigma:g} in '{path.parent}' "
                f"(available: {', '.join(f'{s:g}' for s in have) or 'none'}); train them with "
                f"'torchfpi train denoise --model {kind} --sigma {sigma:g}'"
            )
    blob = read_weights(path, "denoise", "torchfpi denoiser weights")
    check_kind(blob, path, kind, "--model")
    if weights is not None:  # a file the user chose: say so if it was trained for another noise level
        text = sigma_mismatch(blob, path, sigma)
        if text is not None:
            warnings.warn(text, UserWarning, stacklevel=2)
    try:
        model = build_model(blob["kind"], blob["config"])
        model.load_state_dict(blob["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError, UsageError) as exc:
        raise DataError(f"'{path}' is not a torchfpi denoiser weights file ({describe_exception(exc)})") from exc
    model.eval()
    meta = {k: blob.get(k) for k in ("kind", "sigma", "config")}
    meta["meta"] = blob["meta"]
    train = blob.get("train", {})
    meta["train"] = {k: train.get(k) for k in ("steps", "seconds", "best", "settings")}
    meta["weights"] = str(path)
    return model, meta


@torch.no_grad()
def denoise_array(
    model: nn.Module, noisy: np.ndarray, sigma: float, tol: Optional[float] = None,
    max_iter: Optional[int] = None,
) -> Tuple[np.ndarray, Dict[str, float]]:
    """Denoise one ``(H, W)`` [0, 255] image; returns the estimate (not clipped) and solve stats.

    Raises:
        UsageError: ``noisy`` is not 2-D or a side is shorter than :data:`MIN_IMAGE_SIDE`.
    """
    shape = np.shape(noisy)
    if len(shape) != 2 or min(shape) < MIN_IMAGE_SIDE:
        raise UsageError(f"image: expected a 2-D grey image of at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} "
                         f"pixels, got shape {tuple(shape)}")
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    y = torch.tensor(np.asarray(noisy, dtype=np.float64) / 255.0, dtype=torch.float32, device=device)[None, None]
    kw: Dict[str, Any] = {}
    if tol is not None and model.kind != "unrolled":
        kw["tol"] = tol
    if max_iter is not None and model.kind != "unrolled":
        kw["max_iter"] = max_iter
    out = model(y, **kw)
    info: Any = model.last_info
    return out[0, 0].double().cpu().numpy() * 255.0, {
        "forward_iterations": float(info.iterations), "residual": float(info.residual)}
