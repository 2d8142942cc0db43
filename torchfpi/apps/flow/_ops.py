"""Image operations shared by the flow models: warping, derivatives, pyramids, median filter, I/O.

Conventions: images are ``(B, 1, H, W)`` float tensors on the [0, 255] scale; flows are
``(B, 2, H, W)`` with channel 0 = ``u`` (x, columns) and channel 1 = ``v`` (y, rows). Pixel
``(x, y)`` of frame 1 moves to ``(x + u, y + v)`` in frame 2.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from torchfpi.data.datasets import MIDDLEBURY_GT_SEQUENCES  # noqa: F401  # re-exported; lives with MiddleburyPairs
from torchfpi.errors import DataError, UsageError

PathLike = Union[str, "os.PathLike[str]"]


def pixel_grid(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Pixel coordinates ``(1, 2, H, W)``: channel 0 = x (column), channel 1 = y (row)."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack([xs, ys], dim=0)[None]


def warp(image: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear") -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward warping: ``out(x) = image(x + flow(x))`` with ``grid_sample``.

    Args:
        image: ``(B, C, H, W)`` (the second frame).
        flow: ``(B, 2, H, W)`` flow from the first frame to ``image``.
        mode: ``"bilinear"`` or ``"bicubic"``.

    Returns:
        ``(warped (B, C, H, W), inside (B, 1, H, W) bool)``; ``inside`` marks pixels whose target
        lies within the image (elsewhere the border value is used).

    Raises:
        ValueError: if the sizes of ``image`` and ``flow`` differ.
    """
    if flow.dim() != 4 or flow.shape[1] != 2 or flow.shape[-2:] != image.shape[-2:] or flow.shape[0] != image.shape[0]:
        raise ValueError(f"warp: flow must be (B, 2, H, W) matching image {tuple(image.shape)}, got {tuple(flow.shape)}")
    b, _, h, w = image.shape
    pos = pixel_grid(h, w, flow.device, flow.dtype) + flow
    gx = 2.0 * pos[:, 0] / max(w - 1, 1) - 1.0
    gy = 2.0 * pos[:, 1] / max(h - 1, 1) - 1.0
    grid = torch.stack([gx, gy], dim=-1)
    out = F.grid_sample(image, grid, mode=mode, padding_mode="border", align_corners=True)
    inside = (pos[:, 0] >= 0) & (pos[:, 0] <= w - 1) & (pos[:, 1] >= 0) & (pos[:, 1] <= h - 1)
    return out, inside[:, None]


_D5 = torch.tensor([1.0, -8.0, 0.0, 8.0, -1.0]) / 12.0


def gradient(image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Five-point central derivatives ``(d/dx, d/dy)`` of ``(B, 1, H, W)`` with replicated borders."""
    k = _D5.to(image)
    dx = F.conv2d(F.pad(image, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5))
    dy = F.conv2d(F.pad(image, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1))
    return dx, dy


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` (replicated borders); identity for ``sigma <= 0``."""
    if sigma <= 0:
        return image
    r = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-r, r + 1, dtype=image.dtype, device=image.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = image.shape[1]
    out = F.conv2d(F.pad(image, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(out, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def pyramid_sizes(h: int, w: int, scale: float = 0.5, min_size: int = 16, max_levels: int = 10) -> List[Tuple[int, int]]:
    """Sizes from fine to coarse, each ``scale`` times the previous, the coarsest at least ``min_size``."""
    sizes = [(h, w)]
    while len(sizes) < max_levels:
        nh, nw = int(round(sizes[-1][0] * scale)), int(round(sizes[-1][1] * scale))
        if min(nh, nw) < min_size:
            break
        sizes.append((nh, nw))
    return sizes


def resize_image(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Anti-aliased bilinear resize of ``(B, C, H, W)`` to ``size``."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_flow(flow: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Resize a flow ``(B, 2, H, W)`` to ``size``, scaling ``u`` and ``v`` by the size ratios."""
    h, w = flow.shape[-2:]
    if (h, w) == tuple(size):
        return flow
    out = F.interpolate(flow, size=size, mode="bilinear", align_corners=True)
    sx = (size[1] - 1) / max(w - 1, 1)
    sy = (size[0] - 1) / max(h - 1, 1)
    return out * torch.tensor([sx, sy], dtype=flow.dtype, device=flow.device).view(1, 2, 1, 1)


def median_filter(x: torch.Tensor, size: int = 5) -> torch.Tensor:
    """``size x size`` median filter of ``(B, C, H, W)`` with replicated borders (``size <= 1``: identity)."""
    if size <= 1:
        return x
    r = size // 2
    b, c, h, w = x.shape
    patches = F.unfold(F.pad(x, (r, r, r, r), mode="replicate"), size)  # (B, C*size*size, H*W)
    patches = patches.view(b, c, size * size, h * w)
    return patches.median(dim=2).values.view(b, c, h, w)


def to_grey_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8/float image ``(H, W)`` or ``(H, W, 3)`` (RGB) to a grey ``(1, 1, H, W)`` float32 tensor in [0, 255]."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected an image (H, W) or (H, W, 3), got shape {np.asarray(image).shape}")
    return torch.from_numpy(np.ascontiguousarray(arr))[None, None]


def read_image(path: PathLike) -> np.ndarray:
    """Read an image file as a uint8 array (grey ``(H, W)`` or RGB ``(H, W, 3)``).

    Raises:
        FileNotFoundError: if it does not exist.
        DataError: if it cannot be decoded as an image.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"'{path}': cannot read it as an image ({exc})") from exc


def check_pair(frame1: torch.Tensor, frame2: torch.Tensor) -> None:
    """Raise :class:`UsageError` unless both frames are ``(B, 1, H, W)`` of the same size, at least 8x8."""
    for name, fr in (("frame1", frame1), ("frame2", frame2)):
        if fr.dim() != 4 or fr.shape[1] != 1:
            raise UsageError(f"{name}: expected a grey image tensor (B, 1, H, W), got {tuple(fr.shape)}")
    if frame1.shape != frame2.shape:
        raise UsageError(
            f"frame sizes differ: frame1 is {tuple(frame1.shape[-2:])} (H, W) but frame2 is {tuple(frame2.shape[-2:])}"
        )
    if min(frame1.shape[-2:]) < 8:
        raise UsageError(f"frames are too small: {tuple(frame1.shape[-2:])}, need at least 8x8")


def load_middlebury(root: PathLike, sequence: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load ``(frame10, frame11, gt_flow)`` of a Middlebury "other" sequence with ground truth.

    Args:
        root: the data root (holding ``flow/middlebury``).
        sequence: one of :data:`MIDDLEBURY_GT_SEQUENCES`.

    Raises:
        DataError: a file of the sequence is missing (the message names it and the command that
            fetches the data set) or unreadable.
    """
    from torchfpi.data import fetch_hint
    from torchfpi.data.flo import read_flo

    base = Path(root) / "flow" / "middlebury"
    for part in (base / "other-data" / sequence / "frame10.png", base / "other-data" / sequence / "frame11.png",
                 base / "other-gt-flow" / sequence / "flow10.flo"):
        if not part.is_file():
            raise DataError(f"Middlebury {sequence}: '{part}' does not exist; {fetch_hint('middlebury')} "
                            "(or point --data-root / $TORCHFPI_DATA at it)")
    f1 = read_image(base / "other-data" / sequence / "frame10.png")
    f2 = read_image(base / "other-data" / sequence / "frame11.png")
    gt = read_flo(base / "other-gt-flow" / sequence / "flow10.flo")
    return f1, f2, gt
