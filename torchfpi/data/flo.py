"""Middlebury ``.flo`` optical-flow files: read, write, end-point error and colour-wheel images.

Format (Baker et al., IJCV 2011): little-endian float32 magic ``202021.25``, int32 width,
int32 height, then ``H * W * 2`` float32 values ``(u, v)`` interleaved row by row. ``u`` is the
horizontal (column) displacement, ``v`` the vertical (row) one: pixel ``(x, y)`` of the first
frame moves to ``(x + u, y + v)`` in the second. Values above ``1e9`` mean "unknown".

Flows are numpy arrays of shape ``(H, W, 2)`` here (the file's layout); the flow models use
torch tensors ``(B, 2, H, W)``. :func:`end_point_error` accepts both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from torchfpi.errors import DataError
from torchfpi.io import atomic_write_bytes

PathLike = Union[str, "os.PathLike[str]"]

FLO_MAGIC = 202021.25
UNKNOWN_THRESHOLD = 1e9

__all__ = [
    "FLO_MAGIC",
    "UNKNOWN_THRESHOLD",
    "read_flo",
    "write_flo",
    "valid_mask",
    "end_point_error",
    "flow_to_color",
    "write_flow_png",
]


def read_flo(path: PathLike) -> np.ndarray:
    """Read a ``.flo`` file into a float32 array ``(H, W, 2)`` holding ``(u, v)``.

    The values are read by OpenCV (``cv2.readOpticalFlow``); the header is checked here first, so
    that a damaged file is one clear error and never a huge allocation. Unknown values (above
    ``1e9``) are kept as they are; use :func:`valid_mask` to mask them.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        DataError: if the magic number is wrong, the header is truncated, the size is not
            positive, or the file holds fewer or more values than ``H * W * 2``.
        MissingExtraError: OpenCV (the ``apps`` extra) is not installed.
    """
    from torchfpi.runtime import require

    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(12)
    size = path.stat().st_size
    if len(head) < 12:
        raise DataError(f"'{path}': truncated .flo header ({len(head)} bytes, expected at least 12)")
    magic = float(np.frombuffer(head, dtype="<f4", count=1)[0])
    if magic != FLO_MAGIC:
        raise DataError(f"'{path}': not a .flo file (magic number {magic!r}, expected {FLO_MAGIC})")
    width, height = (int(x) for x in np.frombuffer(head, dtype="<i4", count=2, offset=4))
    if width <= 0 or height <= 0 or width * height > 1 << 28:
        raise DataError(f"'{path}': implausible flow size {width}x{height} in the header")
    expected = 12 + 8 * width * height
    if size != expected:
        raise DataError(
            f"'{path}': size {size} bytes does not match the header "
            f"({width}x{height} needs {expected} bytes): truncated or corrupt file"
        )
    flow = require("cv2").readOpticalFlow(str(path))
    if flow is None or flow.shape != (height, width, 2):  # pragma: no cover - the header was checked
        raise DataError(f"'{path}': OpenCV could not read this .flo file")
    return np.asarray(flow, dtype=np.float32)


def write_flo(path: PathLike, flow: np.ndarray) -> None:
    """Write a flow ``(H, W, 2)`` (or a torch tensor ``(2, H, W)``/``(1, 2, H, W)``) as ``.flo``, atomically.

    OpenCV (``cv2.writeOpticalFlow``) encodes the file in a private temporary folder; its bytes
    then replace ``path`` in one rename (:func:`torchfpi.io.atomic_write_bytes`), so a reader never
    sees half a file.

    Raises:
        ValueError: if ``flow`` does not have one of those shapes.
        MissingExtraError: OpenCV (the ``apps`` extra) is not installed.
    """
    import tempfile

    from torchfpi.runtime import require

    flow = np.ascontiguousarray(_as_hw2(flow, "flow"), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="torchfpi-flo-") as tmp:
        encoded = Path(tmp) / "flow.flo"
        if not require("cv2").writeOpticalFlow(str(encoded), flow):  # pragma: no cover
            raise OSError(f"OpenCV could not encode a .flo file for '{path}'")
        data = encoded.read_bytes()
    atomic_write_bytes(path, data)


def _as_hw2(flow: object, name: str) -> np.ndarray:
    """Convert numpy ``(H, W, 2)`` or torch ``(2, H, W)`` / ``(1, 2, H, W)`` to numpy ``(H, W, 2)``."""
    try:
        import torch

        if isinstance(flow, torch.Tensor):
            t = flow.detach().cpu()
            if t.dim() == 4 and t.shape[0] == 1:
                t = t[0]
            if t.dim() != 3 or t.shape[0] != 2:
                raise ValueError(f"{name}: expected a tensor (2, H, W) or (1, 2, H, W), got {tuple(flow.shape)}")
            return t.permute(1, 2, 0).numpy().astype(np.float32)
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(flow)
    if arr.ndim != 3 or arr.shape[2] != 2:
        raise ValueError(f"{name}: expected an array (H, W, 2), got shape {arr.shape}")
    return arr.astype(np.float32)


def valid_mask(flow: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: True where both components are finite and not above ``1e9`` in magnitude."""
    flow = _as_hw2(flow, "flow")
    return np.isfinite(flow).all(axis=2) & (np.abs(flow) <= UNKNOWN_THRESHOLD).all(axis=2)


def end_point_error(estimate: object, truth: object) -> float:
    """Average end-point error: mean over pixels with known truth of ``||estimate - truth||_2``.

    Args:
        estimate: flow ``(H, W, 2)`` (numpy) or ``(2, H, W)`` / ``(1, 2, H, W)`` (torch).
        truth: ground truth of the same size; values above ``1e9`` are unknown and skipped.

    Raises:
        ValueError: if the sizes differ or no pixel of ``truth`` is known.
    """
    est = _as_hw2(estimate, "estimate")
    gt = _as_hw2(truth, "truth")
    if est.shape != gt.shape:
        raise ValueError(f"estimate has shape {est.shape} but truth has shape {gt.shape}")
    mask = valid_mask(gt)
    if not mask.any():
        raise ValueError("truth has no known pixel (all values above 1e9 or not finite)")
    diff = est[mask].astype(np.float64) - gt[mask].astype(np.float64)
    return float(np.sqrt((diff**2).sum(axis=1)).mean())


def _color_wheel() -> np.ndarray:
    """The Middlebury colour wheel (Baker et al.): 55 hues, RGB in [0, 255], shape (55, 3)."""
    segments = [(15, (255, 0, 0), (255, 255, 0)), (6, (255, 255, 0), (0, 255, 0)),
                (4, (0, 255, 0), (0, 255, 255)), (11, (0, 255, 255), (0, 0, 255)),
                (13, (0, 0, 255), (255, 0, 255)), (6, (255, 0, 255), (255, 0, 0))]  # fmt: skip
    rows = []
    for n, start, end in segments:
        t = np.arange(n, dtype=np.float64)[:, None] / n
        rows.append(np.asarray(start, float) * (1 - t) + np.asarray(end, float) * t)
    return np.concatenate(rows, axis=0)


def flow_to_color(flow: object, max_flow: Optional[float] = None) -> np.ndarray:
    """Colour-code a flow with the Middlebury wheel: hue = direction, saturation = magnitude.

    Our own code: neither OpenCV (its main modules, the ones ``opencv-python-headless`` ships)
    nor scikit-image has the Middlebury colour wheel.

    Args:
        flow: ``(H, W, 2)`` numpy or ``(2, H, W)`` torch flow.
        max_flow: magnitude shown fully saturated; default: the largest known magnitude.

    Returns:
        uint8 RGB image ``(H, W, 3)``; unknown pixels are black.
    """
    flow = _as_hw2(flow, "flow")
    mask = valid_mask(flow)
    u = np.where(mask, flow[..., 0], 0.0).astype(np.float64)
    v = np.where(mask, flow[..., 1], 0.0).astype(np.float64)
    mag = np.sqrt(u**2 + v**2)
    if max_flow is None:
        max_flow = float(mag.max()) if mag.size else 1.0
    max_flow = max(float(max_flow), 1e-8)
    u, v, mag = u / max_flow, v / max_flow, mag / max_flow
    wheel = _color_wheel()
    ncols = wheel.shape[0]
    angle = np.arctan2(-v, -u) / np.pi  # in [-1, 1]
    fk = (angle + 1) / 2 * (ncols - 1)
    k0 = np.floor(fk).astype(int) % ncols
    k1 = (k0 + 1) % ncols
    frac = (fk - np.floor(fk))[..., None]
    col = ((1 - frac) * wheel[k0] + frac * wheel[k1]) / 255.0
    small = (mag <= 1)[..., None]
    rad = np.minimum(mag, 1.0)[..., None]
    col = np.where(small, 1 - rad * (1 - col), col * 0.75)
    img = np.clip(np.floor(255 * col), 0, 255).astype(np.uint8)
    img[~mask] = 0
    return img


def write_flow_png(path: PathLike, flow: object, max_flow: Optional[float] = None) -> Tuple[int, int]:
    """Write :func:`flow_to_color` of ``flow`` as an RGB PNG (atomically); return ``(H, W)``."""
    import io

    from PIL import Image

    img = flow_to_color(flow, max_flow)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return img.shape[0], img.shape[1]
