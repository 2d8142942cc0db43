"""What a weights file was trained for, stored inside it, and the one safe way to read it back.

Every weights file the applications write (and every file shipped in ``torchfpi/weights``) holds a
``meta`` dict beside its tensors::

    {"format": "torchfpi-weights", "format_version": 1, "app": "denoise" | "flow",
     "kind": "fpi_gd" | "unrolled" | "fpi_nn", "sigma": 25.0 (denoise only),
     "architecture": {...}, "data": "...", "torchfpi": "0.1.0"}

``architecture`` is the model configuration the state dict needs (the energy's filter bank for
the denoisers, the solver settings for flow). Loaders read files with ``weights_only=True`` only
(:func:`torchfpi.io.safe_load`), so a crafted file cannot run code, and compare ``meta`` with what
the user asked for: a file of another application or another model kind is refused with a
message that names both; a denoiser trained for another noise level is loaded with a warning
that names its sigma (it still works, less well). Files without ``meta`` (written by torchfpi
0.1) are read from their legacy keys.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from torchfpi.errors import DataError, UsageError
from torchfpi.io import PathLike, safe_load

FORMAT = "torchfpi-weights"
FORMAT_VERSION = 1


def weights_meta(app: str, kind: str, architecture: Dict[str, Any], sigma: Optional[float] = None,
                 data: Optional[str] = None) -> Dict[str, Any]:
    """The ``meta`` dict of a weights file (plain data: loads under ``weights_only=True``).

    Example:
        >>> weights_meta("denoise", "fpi_gd", {"tol": 1e-3}, sigma=25)["sigma"]
        25.0
    """
    from torchfpi import __version__

    meta: Dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "app": app, "kind": kind,
                            "architecture": dict(architecture), "torchfpi": __version__}
    if sigma is not None:
        meta["sigma"] = float(sigma)
    if data is not None:
        meta["data"] = data
    return meta


def _legacy_meta(blob: Dict[str, Any]) -> Dict[str, Any]:
    """``meta`` of a file written before it existed, from the keys each writer used."""
    if {"kind", "state_dict", "config"} <= set(blob):
        return {"app": "denoise", "kind": blob["kind"], "sigma": blob.get("sigma"), "architecture": blob["config"]}
    if "update" in blob and "base" in blob:
        return {"app": "flow", "kind": "fpi_nn", "architecture": blob.get("refine_config", {})}
    if "model" in blob and "flow_config" in blob:
        return {"app": "flow", "kind": "fpi_gd", "architecture": blob["flow_config"]}
    if {"model", "optimizer", "step"} <= set(blob):
        return {"app": "checkpoint", "kind": "training checkpoint"}
    return {}


def read_weights(path: PathLike, app: str, what: str) -> Dict[str, Any]:
    """Read a weights file of application ``app`` safely; the returned dict has a ``meta`` entry.

    Raises:
        FileNotFoundError: no such file.
        DataError: not a torch file, a file holding objects other than tensors and plain data
            (never loaded), or weights of another application (the message says whose).
    """
    blob = safe_load(path, what)
    if not isinstance(blob, dict):
        raise DataError(f"'{path}' is not a {what} file (it holds a {type(blob).__name__}, expected a dict "
                        "with the weights and their metadata)")
    meta = blob.get("meta")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        meta = _legacy_meta(blob)
    if meta.get("app") != app:
        held = {"denoise": "denoiser weights", "flow": "flow weights",
                "checkpoint": "a training checkpoint"}.get(str(meta.get("app")), "")
        raise DataError(f"'{path}' is not a {what} file" + (f" (it holds {held})" if held else ""))
    blob["meta"] = meta
    return blob


def check_kind(blob: Dict[str, Any], path: PathLike, kind: str, flag: str) -> None:
    """Refuse weights of another model kind, naming the flag that would match them.

    Raises:
        UsageError: ``blob``'s kind is not ``kind``.
    """
    have = blob["meta"].get("kind")
    if have != kind:
        raise UsageError(f"{flag}: '{path}' holds {have} weights, not {kind}: pass {flag} {have}, "
                         "or weights of that model")


def sigma_mismatch(blob: Dict[str, Any], path: PathLike, sigma: float) -> Optional[str]:
    """The warning text when a denoiser's weights were trained for another noise level, else None."""
    have = blob["meta"].get("sigma")
    if have is None or abs(float(have) - float(sigma)) < 1e-9:
        return None
    return (f"--sigma {sigma:g}: the weights '{path}' were trained for sigma {float(have):g}; expect a worse "
            f"result than with weights trained for sigma {sigma:g}")


__all__ = ["FORMAT", "FORMAT_VERSION", "check_kind", "read_weights", "sigma_mismatch", "weights_meta"]
