"""Baselines: OpenCV Farneback and DIS, and Horn-Schunck written as a plain fixed-point iteration.

Horn-Schunck (1981) minimises, per warp of a coarse-to-fine pyramid,

    E(u, v) = sum_p (I_t + I_x (u - u0) + I_y (v - v0))^2 + alpha^2 (|grad u|^2 + |grad v|^2),

and its Jacobi update is the fixed-point map solved here with the library's fixed-point solve:

    u <- u_bar - I_x (I_x u_bar + I_y v_bar + c) / (4 alpha^2 + I_x^2 + I_y^2),   c = I_t - I_x u0 - I_y v0

(``u_bar``: mean of the 4 neighbours; likewise for ``v``).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import torchfpi
from torchfpi.apps.flow import _ops


def _grey_uint8(image: np.ndarray) -> np.ndarray:
    t = _ops.to_grey_tensor(image)[0, 0].numpy()
    return np.clip(np.round(t), 0, 255).astype(np.uint8)


def farneback(frame1: np.ndarray, frame2: np.ndarray) -> np.ndarray:
    """OpenCV Farneback flow on grey frames (OpenCV's usual settings); returns ``(H, W, 2)`` float32."""
    import cv2

    g1, g2 = _grey_uint8(frame1), _grey_uint8(frame2)
    if g1.shape != g2.shape:
        raise ValueError(f"frame sizes differ: {g1.shape} and {g2.shape}")
    flow = cv2.calcOpticalFlowFarneback(g1, g2, None, 0.5, 3, 15, 3, 5, 1.2, 0)  # type: ignore[call-overload]
    return np.asarray(flow, dtype=np.float32)


def dis(frame1: np.ndarray, frame2: np.ndarray, preset: str = "medium") -> np.ndarray:
    """OpenCV DIS flow (``preset``: ``"ultrafast"``, ``"fast"`` or ``"medium"``) on grey frames."""
    import cv2

    presets = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
               "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
    if preset not in presets:
        raise ValueError(f"preset: expected one of {sorted(presets)}, got {preset!r}")
    g1, g2 = _grey_uint8(frame1), _grey_uint8(frame2)
    if g1.shape != g2.shape:
        raise ValueError(f"frame sizes differ: {g1.shape} and {g2.shape}")
    dis_flow = cv2.DISOpticalFlow_create(presets[preset])  # type: ignore[attr-defined]
    return np.asarray(dis_flow.calc(g1, g2, None), dtype=np.float32)


def _neighbour_mean(z: torch.Tensor) -> torch.Tensor:
    p = F.pad(z, (1, 1, 1, 1), mode="replicate")
    return 0.25 * (p[..., 1:-1, :-2] + p[..., 1:-1, 2:] + p[..., :-2, 1:-1] + p[..., 2:, 1:-1])


def horn_schunck_step(z: torch.Tensor, ix: torch.Tensor, iy: torch.Tensor, c: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """One Jacobi update of Horn-Schunck: the fixed-point map ``f(z)``; ``z`` is ``(B, 2, H, W)``."""
    zb = _neighbour_mean(z)
    ub, vb = zb[:, :1], zb[:, 1:]
    t = (ix * ub + iy * vb + c) / (4 * alpha**2 + ix**2 + iy**2)
    return torch.cat([ub - ix * t, vb - iy * t], dim=1)


def horn_schunck(frame1: torch.Tensor, frame2: torch.Tensor, alpha: float = 8.0, warps: int = 3,
                 max_iter: int = 300, tol: float = 1e-4, min_size: int = 16,
                 pre_sigma: float = 1.0) -> Tuple[torch.Tensor, Dict[str, int]]:
    """Coarse-to-fine Horn-Schunck with warping; each warp is a fixed point of its Jacobi update.

    Args:
        frame1, frame2: grey frames ``(B, 1, H, W)`` on the [0, 255] scale.
        alpha: smoothness weight (same scale as the image).
        warps: linearisations per pyramid level. max_iter, tol: per fixed-point solve.
        min_size: smallest side of the coarsest level. pre_sigma: Gaussian pre-smoothing.

    Returns:
        ``(flow (B, 2, H, W), {"iterations": total Jacobi iterations of sample 0, "solves": n})``.

    Raises:
        UsageError: if the frames are not grey ``(B, 1, H, W)`` of the same size.
    """
    _ops.check_pair(frame1, frame2)
    f1 = _ops.gaussian_blur(frame1, pre_sigma)
    f2 = _ops.gaussian_blur(frame2, pre_sigma)
    sizes = _ops.pyramid_sizes(f1.shape[-2], f1.shape[-1], min_size=min_size)
    flow = torch.zeros(f1.shape[0], 2, *sizes[-1], dtype=f1.dtype, device=f1.device)
    total, solves = 0, 0
    for size in reversed(sizes):
        a, b = _ops.resize_image(f1, size), _ops.resize_image(f2, size)
        flow = _ops.resize_flow(flow, size)
        ax, ay = _ops.gradient(a)
        for _ in range(warps):
            bw, inside = _ops.warp(b, flow, mode="bicubic")
            bx, by = _ops.gradient(bw)
            ix, iy = 0.5 * (ax + bx) * inside, 0.5 * (ay + by) * inside
            it = (bw - a) * inside
            c = it - ix * flow[:, :1] - iy * flow[:, 1:]
            sol = torchfpi.fixed_point(horn_schunck_step, flow, ix, iy, c, alpha, solver="fpi", backward="fpi",
                                       tol=tol, max_iter=max_iter, backward_tol=1e-3, backward_max_iter=50,
                                       on_failure="ignore")
            flow = sol.value
            total += int(sol.iterations[0])
            solves += 1
    return flow, {"iterations": total, "solves": solves}


class HornSchunck(torch.nn.Module):
    """:func:`horn_schunck` (default settings) as a model: ``flow, info = model(frame1, frame2)``.

    It has no learned weights; :func:`torchfpi.apps.flow.load_flow_model` returns it for
    ``"horn_schunck"``, so the CLI and the scripts run every method the same way.
    """

    def forward(self, frame1: torch.Tensor, frame2: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, int]]:
        return horn_schunck(frame1, frame2)
